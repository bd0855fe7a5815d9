"""Calls through a real relay process to a real transceiver process, with real WebRTC clients:
aiortc for the audio, and the project's own client-role Session for protocol misbehaviour. Every
test runs twice: the relay forwarding in userspace, and with the kernel fast path."""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
import pytest

from tests.support.fastpath import MODES, assert_mode, relay_args, require_mode
from tests.support.procs import RelayProcess, TransceiverProcess, wait_for
from tests.transceiver.test_sdp_rtp import CHROME_OFFER
from voicerelay.cli.call_client import place_call
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.wire import stun

CONSENT_TIMEOUT = 2.0  # shortened by configuration (`--consent-timeout`), not by waiting 30 s
PURE = 0.9  # share of the echoed energy that must be the caller's own tone


@pytest.fixture(autouse=True)
def brisk_consent(monkeypatch):
    """aiortc's ICE (aioice) sends a consent check every 4-6 s, so a transceiver whose consent
    expires after 2 s reaps honest aiortc calls too. The honest clients here check every
    0.4-0.6 s instead; the silent ones still go silent."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)


@pytest.fixture(scope="module", params=MODES)
def stack(tmp_path_factory, request):
    require_mode(request.param)
    extra = relay_args(request.param)
    with (
        RelayProcess(tmp_path_factory.mktemp("stack"), workers=2, extra=extra) as relay,
        TransceiverProcess(relay, consent_timeout=CONSENT_TIMEOUT) as transceiver,
    ):
        assert_mode(relay, request.param)
        yield relay, transceiver


def _relay_moved(relay: RelayProcess, before: dict, packets: int) -> bool:
    totals = relay.stats()["totals"]
    return (
        totals["packets_in"] - before["packets_in"] >= packets
        and totals["packets_out"] - before["packets_out"] >= packets
    )


def test_a_tone_comes_back_through_the_relay(stack):
    relay, transceiver = stack
    before = relay.stats()["totals"]
    report = asyncio.run(place_call(transceiver.url, 440.0, seconds=2.0))
    assert report.error is None, report.error
    assert report.tone_came_back, report
    assert abs(report.received_hz - 440.0) < 10  # the FFT peak is our tone...
    assert report.purity > PURE, report.purity  # ...and most of what came back is that tone
    assert report.audio_seconds > 1.5  # it kept coming for the whole call
    assert report.setup_ms is not None and report.setup_ms < 5000
    assert report.stats["delete_status"] == 204
    # It really went through the relay, both ways (counters published every 100 ms), and with
    # the fast path on, the kernel carried the media once the call was established.
    wait_for(lambda: _relay_moved(relay, before, 50), 2, what="relay counters")
    if relay.status()["fast_path"].startswith("on"):
        wait_for(
            lambda: (
                (t := relay.stats()["totals"])["kernel_packets_in"] >= 40
                and t["kernel_packets_out"] >= 40
            ),
            3,
            what="the kernel to have forwarded the call's media",
        )


def test_rtcp_reports_flow_both_ways(stack):
    """The transceiver sends RTCP reports on what it receives (aiortc reads them as
    remote-inbound-rtp) and reads aiortc's reports on what it echoes (its RTT)."""
    _, transceiver = stack
    # Our first report goes 1 s after DTLS; aiortc reports every 0.5-1.5 s, so its first report
    # on ours (what the RTT comes from) may come 2.6 s into the call: 5 s leaves room for a
    # few of them.
    report = asyncio.run(place_call(transceiver.url, 520.0, seconds=5.0))
    assert report.tone_came_back, report
    ours = report.stats["client"]["remote_inbound"]  # only from the transceiver's report blocks
    assert ours["packets_lost"] <= 2, ours
    server = report.stats["server"]
    assert server["rtcp_out"] >= 1 and server["rtcp_in"] >= 1, server
    assert server["received"] > 50 and server["lost"] <= 2, server
    assert server["rtt"] is not None and 0 <= server["rtt"] < 1.0, server


def test_eight_concurrent_calls_each_hear_only_their_own_tone(stack):
    _, transceiver = stack
    tones = [300.0, 400.0, 500.0, 650.0, 800.0, 950.0, 1100.0, 1300.0]

    async def calls():
        return await asyncio.gather(*(place_call(transceiver.url, t, seconds=2.0) for t in tones))

    reports = asyncio.run(calls())
    for tone, report in zip(tones, reports, strict=True):
        assert report.error is None, report.error
        assert report.received_hz is not None and abs(report.received_hz - tone) < 10, report
        # Another call's audio mixed in (crosstalk) would take a share of the energy.
        assert report.purity > PURE, (tone, report.purity)
        assert report.audio_seconds > 1.2, (tone, report.audio_seconds)


def test_delete_ends_the_session_on_both_sides(stack):
    _, transceiver = stack
    before = transceiver.stats()["closed"].get("deleted", 0)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            call = ClientCall(Certificate.generate())
            await call.connect(http, transceiver.url)
            await asyncio.wait_for(call.secure, 5)
            async with http.get(call.location) as r:
                assert r.status == 200 and (await r.json())["state"] == "secure"
            assert await call.hang_up(http) == 204
            reason = await asyncio.wait_for(call.closed, 5)  # the server's close_notify arrived
            async with http.get(call.location) as r:
                gone = r.status
            status_again = await call.hang_up(http)
            call.close()
            return reason, gone, status_again

    reason, gone, status_again = asyncio.run(scenario())
    assert reason == "peer-closed"  # the client side ended because the server said so
    assert gone == 404 and status_again == 404  # the server side is gone
    assert transceiver.stats()["closed"]["deleted"] == before + 1


def _offer() -> str:
    return sdp.build_offer(
        ice_ufrag="cliU",
        ice_pwd="p" * 22,
        fingerprint=Certificate.generate().fingerprint,
        ssrc=1,
        cname="x",
    )


BAD_OFFERS = [
    # (body, content type, status, what the body must say)
    ("hello", "application/sdp", 400, "not SDP"),
    (_offer().replace("m=audio", "m=video"), "application/sdp", 400, "no audio"),
    (_offer().replace("opus/48000/2", "PCMU/8000"), "application/sdp", 400, "no Opus"),
    (_offer().replace("a=fingerprint", "a=x-fingerprint"), "application/sdp", 400, "fingerprint"),
    (_offer().replace("a=setup:actpass", "a=setup:holdconn"), "application/sdp", 400, "setup"),
    (_offer(), "text/plain", 415, "application/sdp"),
    ("v=0\r\n" + "a=x\r\n" * 20000, "application/sdp", 413, "larger than"),
]


def _wrong_integrity_checks(
    relay: RelayProcess, username: bytes, count: int = 5
) -> tuple[list[bytes], list]:
    """From a new address, Binding requests with USE-CANDIDATE but the wrong password (an
    attempt to steal the nomination); returns whatever came back, and that address."""
    with relay.client_socket() as attacker:
        address = list(attacker.getsockname())
        attacker.settimeout(0.3)
        replies = []
        for _ in range(count):
            attacker.sendto(
                stun.build(
                    stun.BINDING_REQUEST,
                    os.urandom(12),
                    [
                        (stun.ATTR_USERNAME, username),
                        (stun.ATTR_USE_CANDIDATE, b""),
                        (stun.ATTR_PRIORITY, stun.encode_u32(0x7EFFFFFF)),
                    ],
                    integrity_key=b"not the password at all",
                ),
                relay.public,
            )
            with contextlib.suppress(TimeoutError):
                replies.append(attacker.recv(2048))
        return replies, address


async def _gone(http: aiohttp.ClientSession, location: str, within: float) -> bool:
    """Poll a session's URL until it is 404 (reaped), for at most `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        async with http.get(location) as r:
            if r.status == 404:
                return True
        await asyncio.sleep(0.05)
    return False


def test_misbehaving_peers_do_not_disturb_a_call_in_progress(stack):
    relay, transceiver = stack
    before = transceiver.stats()["closed"]

    async def scenario():
        started = asyncio.get_running_loop().create_future()
        good = asyncio.ensure_future(
            place_call(transceiver.url, 700.0, seconds=6.0, audio_started=started)
        )
        on = await asyncio.wait_for(started, 15)  # the call is on
        answer, offer = sdp.parse_answer(on.answer_sdp), sdp.parse_offer(on.offer_sdp)
        async with aiohttp.ClientSession() as http:
            # 1. Malformed offers: a 4xx whose body says what is wrong.
            for body, ctype, status, says in BAD_OFFERS:
                async with http.post(
                    transceiver.url + "/v1/sessions", data=body, headers={"Content-Type": ctype}
                ) as r:
                    assert (r.status, says in await r.text()) == (status, True), (says, r.status)

            # 2. Checks with the wrong MESSAGE-INTEGRITY, for this very call: no answer at all.
            stolen, attacker = await asyncio.to_thread(
                _wrong_integrity_checks, relay, f"{answer.ice_ufrag}:{offer.ice_ufrag}".encode()
            )

            # 3. A DTLS peer whose certificate does not match its offer's fingerprint is closed.
            liar = ClientCall(Certificate.generate())
            await liar.connect(
                http,
                transceiver.url,
                CallOptions(advertised_fingerprint=Certificate.generate().fingerprint),
            )
            liar_reason = await asyncio.wait_for(liar.closed, 5)
            liar_gone = await _gone(http, liar.location, 2)
            liar.close()

            # 4. A client that goes silent is reaped by consent freshness, mid-call.
            silent = ClientCall(Certificate.generate())
            await silent.connect(http, transceiver.url)
            await asyncio.wait_for(silent.secure, 5)
            silent.pause_timers()
            silent_gone = await _gone(http, silent.location, CONSENT_TIMEOUT + 3)
            still_in_progress = not good.done()
            silent.close()

            report = await good
            return stolen, attacker, liar_reason, liar_gone, silent_gone, still_in_progress, report

    stolen, attacker, liar_reason, liar_gone, silent_gone, in_progress, report = asyncio.run(
        scenario()
    )
    assert stolen == []  # not one STUN answer for a wrong MESSAGE-INTEGRITY
    assert liar_reason == "peer-closed" and liar_gone  # the impostor heard close_notify
    assert silent_gone and in_progress  # reaped while the good call was still talking
    closed = transceiver.stats()["closed"]
    for reason in ("consent-expired", "fingerprint-mismatch"):
        assert closed.get(reason, 0) > before.get(reason, 0), closed
    # The honest call never noticed: its tone, clean, for the whole call, without a dropout.
    assert report.tone_came_back and report.purity > PURE, report
    assert report.audio_seconds > 5.0 and report.max_frame_gap_ms < 1000, report
    assert report.stats["server"]["ice_bad_integrity"] >= 5  # the attack was seen and refused
    assert report.stats["server"]["remote"] != attacker  # the nomination was not stolen
    assert report.stats["delete_status"] == 204


def test_the_answer_is_ice_lite_opus_only_with_the_relay_as_only_candidate(stack):
    relay, transceiver = stack

    async def post(offer: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                transceiver.url + "/v1/sessions",
                data=offer,
                headers={"Content-Type": "application/sdp"},
            ) as r,
        ):
            return r.status, await r.text()

    status, answer = asyncio.run(post(CHROME_OFFER))  # Opus among G722, RED, PCMU...
    assert status == 201
    lines = answer.splitlines()
    assert "a=ice-lite" in lines
    audio = [ln for ln in lines if ln.startswith("m=audio")]
    assert audio == [f"m=audio {relay.port} UDP/TLS/RTP/SAVPF 111"]  # one payload type: Opus
    assert [ln for ln in lines if ln.startswith("a=rtpmap:")] == ["a=rtpmap:111 opus/48000/2"]
    candidates = [ln for ln in lines if ln.startswith("a=candidate:")]
    assert len(candidates) == 1
    assert candidates[0].split()[4:8] == ["127.0.0.1", str(relay.port), "typ", "host"]
    assert "a=end-of-candidates" in lines
    assert "c=IN IP4 127.0.0.1" in lines
    assert "a=setup:passive" in lines and "a=rtcp-mux" in lines
    parsed = sdp.parse_answer(answer)
    assert parsed.ice_lite and parsed.candidate == relay.public
    assert transceiver.stats()["sessions"] >= 1


def test_wrong_message_integrity_gets_no_stun_answer(stack):
    relay, transceiver = stack

    async def answer_for_offer():
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                transceiver.url + "/v1/sessions",
                data=_offer(),
                headers={"Content-Type": "application/sdp"},
            ) as r,
        ):
            assert r.status == 201
            return sdp.parse_answer(await r.text()), transceiver.url + r.headers["Location"]

    answer, location = asyncio.run(answer_for_offer())
    username = f"{answer.ice_ufrag}:cliU".encode()
    with relay.client_socket() as client:
        client.settimeout(0.5)
        address = list(client.getsockname())

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

    async def session_stats():
        async with aiohttp.ClientSession() as http, http.get(location) as r:
            return await r.json()

    stats = asyncio.run(session_stats())
    assert stats["ice_bad_integrity"] == 1  # counted, and only the good check nominated
    assert stats["remote"] == address
