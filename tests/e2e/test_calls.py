"""Calls through a real relay process to a real transceiver process, with real WebRTC clients:
aiortc for the audio, and the project's own client-role Session for protocol misbehaviour."""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
import pytest

from tests.support.procs import RelayProcess, TransceiverProcess, wait_for
from voicerelay.cli.call_client import place_call
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.wire import stun

CONSENT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with (
        RelayProcess(tmp_path_factory.mktemp("stack"), workers=2) as relay,
        TransceiverProcess(relay, consent_timeout=CONSENT_TIMEOUT) as transceiver,
    ):
        yield relay, transceiver


def test_a_tone_comes_back_through_the_relay(stack):
    relay, transceiver = stack
    report = asyncio.run(place_call(transceiver.url, 440.0, seconds=1.5))
    assert report.error is None
    assert report.tone_came_back, report
    assert abs(report.received_hz - 440.0) < 10
    assert report.setup_ms is not None and report.setup_ms < 5000
    # It really went through the relay (counters are published on the workers' 100 ms tick).
    wait_for(lambda: relay.stats()["totals"]["packets_in"] > 50, 2, what="relay counters")


def test_eight_concurrent_calls_each_hear_only_their_own_tone(stack):
    _, transceiver = stack
    tones = [300.0, 400.0, 500.0, 650.0, 800.0, 950.0, 1100.0, 1300.0]

    async def calls():
        return await asyncio.gather(*(place_call(transceiver.url, t, seconds=2.0) for t in tones))

    reports = asyncio.run(calls())
    for tone, report in zip(tones, reports, strict=True):
        assert report.error is None, report.error
        assert report.received_hz is not None and abs(report.received_hz - tone) < 10, (
            tone,
            report,
        )


def test_delete_ends_the_session_on_both_sides(stack):
    _, transceiver = stack

    async def scenario():
        async with aiohttp.ClientSession() as http:
            call = ClientCall(Certificate.generate())
            await call.connect(http, transceiver.url)
            await asyncio.wait_for(call.secure, 5)
            assert await call.hang_up(http) == 204
            reason = await asyncio.wait_for(call.closed, 5)  # the server's close_notify arrived
            status_again = await call.hang_up(http)
            call.close()
            return reason, status_again

    reason, status_again = asyncio.run(scenario())
    assert reason == "peer-closed"
    assert status_again == 404


def test_misbehaving_peers_do_not_disturb_a_call_in_progress(stack):
    relay, transceiver = stack
    before = transceiver.stats()["closed"]

    async def scenario():
        good_call = asyncio.ensure_future(place_call(transceiver.url, 700.0, seconds=6.0))
        async with aiohttp.ClientSession() as http:
            # 1. Malformed SDP -> 4xx with a reason; wrong content type -> 415.
            async with http.post(
                transceiver.url + "/v1/sessions",
                data="hello",
                headers={"Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 400 and "v=0" in await r.text()
            no_audio = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
            async with http.post(
                transceiver.url + "/v1/sessions",
                data=no_audio,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 400 and "no audio" in await r.text()
            async with http.post(
                transceiver.url + "/v1/sessions", data="v=0", headers={"Content-Type": "text/plain"}
            ) as r:
                assert r.status == 415

            # 2. A DTLS peer whose certificate does not match its offer's fingerprint is closed.
            liar = ClientCall(Certificate.generate())
            await liar.connect(
                http,
                transceiver.url,
                CallOptions(advertised_fingerprint=Certificate.generate().fingerprint),
            )
            reason = await asyncio.wait_for(liar.closed, 5)
            liar.close()

            # 3. A client that goes silent is reaped by consent freshness.
            silent = ClientCall(Certificate.generate())
            await silent.connect(http, transceiver.url)
            await asyncio.wait_for(silent.secure, 5)
            silent.pause_timers()

            report = await good_call
            silent.close()
            return reason, report

    reason, report = asyncio.run(scenario())
    assert reason == "peer-closed"  # the server said close_notify to the impostor
    assert report.tone_came_back, report  # the honest call never noticed
    closed = wait_for(
        lambda: _grew(transceiver, before, "consent-expired", "fingerprint-mismatch"),
        CONSENT_TIMEOUT + 5,
        0.1,
        "consent reaping and fingerprint close",
    )
    assert closed


def _grew(transceiver, before, *reasons):
    closed = transceiver.stats()["closed"]
    return closed if all(closed.get(r, 0) > before.get(r, 0) for r in reasons) else None


def test_wrong_message_integrity_gets_no_stun_answer(stack):
    relay, transceiver = stack

    async def answer_for_offer():
        cert = Certificate.generate()
        offer = sdp.build_offer(
            ice_ufrag="cliU", ice_pwd="p" * 22, fingerprint=cert.fingerprint, ssrc=1, cname="x"
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                transceiver.url + "/v1/sessions",
                data=offer,
                headers={"Content-Type": "application/sdp"},
            ) as r,
        ):
            assert r.status == 201
            return sdp.parse_answer(await r.text())

    answer = asyncio.run(answer_for_offer())
    username = f"{answer.ice_ufrag}:cliU".encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(0.5)

        def check(key: bytes) -> bytes | None:
            tid = os.urandom(12)
            client.sendto(
                stun.build(
                    stun.BINDING_REQUEST,
                    tid,
                    [(stun.ATTR_USERNAME, username), (stun.ATTR_USE_CANDIDATE, b"")],
                    integrity_key=key,
                ),
                relay.public,
            )
            try:
                return client.recv(2048)
            except TimeoutError:
                return None

        assert check(b"the wrong password!!!!") is None
        good = check(answer.ice_pwd.encode())  # the same path answers a correct check
        assert good is not None and stun.verify_integrity(good, answer.ice_pwd.encode())
        mapped = stun.decode_xor_address(
            stun.parse(good).get(stun.ATTR_XOR_MAPPED_ADDRESS), stun.parse(good).transaction_id
        )
        assert mapped == client.getsockname()  # the relay passed on the client's true address
