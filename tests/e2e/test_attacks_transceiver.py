"""Attacks on the transceiver over the wire (issue 11): a real relay process, a real transceiver
process, the project's own client-role Session as the honest caller, raw sockets as attackers."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from tests.support.procs import RelayProcess, TransceiverProcess, wait_for
from tests.transceiver.test_attacks import offer, stream, wait_until
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.transceiver.session import SessionConfig
from voicerelay.wire import envelope, stun

CONNECT_TIMEOUT = 1.0
MAX_SESSIONS = 4  # few offers: signaling's per-client rate limit must not be what answers
BRISK = SessionConfig(consent_interval=0.25)  # a browser that checks often (see test_calls.py)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with RelayProcess(tmp_path_factory.mktemp("attacks"), workers=2) as relay:
        relay.env.update(  # read by the transceiver (the relay ignores them)
            VOICERELAY_RELAYS="127.0.0.1/32",  # the relay's workers send from here, nobody else
            VOICERELAY_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
            VOICERELAY_MAX_SESSIONS=str(MAX_SESSIONS),
        )
        with TransceiverProcess(relay) as transceiver:
            yield relay, transceiver


async def _stats(http: aiohttp.ClientSession, location: str) -> dict:
    async with http.get(location) as r:
        return await r.json()


def _replay(datagram: bytes, to: tuple[str, int]) -> list[bytes]:
    """Send `datagram` once from a fresh address; whatever comes back within 0.5 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind(("127.0.0.1", 0))
        attacker.settimeout(0.5)
        attacker.sendto(datagram, to)
        try:
            return [attacker.recv(2048)]
        except TimeoutError:
            return []


def test_one_replayed_check_does_not_kill_a_call(stack):
    relay, transceiver = stack

    async def scenario():
        async with aiohttp.ClientSession() as http:
            call = ClientCall(Certificate.generate())
            await call.connect(http, transceiver.url, CallOptions(config=BRISK))
            await asyncio.wait_for(call.secure, 5)
            tapped: list[bytes] = []
            take = call.session.datagrams_to_send

            def tap() -> list:
                out = take()
                tapped.extend(d for d, _ in out)
                return out

            call.session.datagrams_to_send = tap  # type: ignore[method-assign]
            talking = asyncio.create_task(stream(call))
            try:
                await wait_until(lambda: [d for d in tapped if d[0] < 4], 2)
                check = next(d for d in tapped if d[0] < 4)
                assert stun.parse(check).has(stun.ATTR_USE_CANDIDATE)
                answers = await asyncio.to_thread(_replay, check, relay.public)
                heard = call.rtp_received
                await wait_until(lambda: call.rtp_received > heard + 40, 3)  # ~0.8 s more echo
                stats = await _stats(http, call.location)
            finally:
                talking.cancel()
                await call.hang_up(http)
                call.close()
            return answers, stats, call.local_addr

    answers, stats, client = asyncio.run(scenario())
    assert answers == []  # the replayer heard nothing
    assert stats["state"] == "secure" and tuple(stats["remote"]) == client
    assert stats["address_moves"] == 0


def test_a_client_whose_nat_rebinds_is_heard_again_within_a_second(stack):
    _, transceiver = stack

    async def scenario():
        async with aiohttp.ClientSession() as http:
            call = ClientCall(Certificate.generate())
            await call.connect(http, transceiver.url, CallOptions(config=BRISK))
            await asyncio.wait_for(call.secure, 5)
            talking = asyncio.create_task(stream(call))
            try:
                await wait_until(lambda: call.rtp_received > 5, 2)
                await call.rebind()  # a new source port, through the same relay
                heard, new = call.rtp_received, call.local_addr
                took = await wait_until(lambda: call.rtp_received > heard + 3, 1.0)
                stats = await _stats(http, call.location)
            finally:
                talking.cancel()
                await call.hang_up(http)
                call.close()
            return took, stats, new

    took, stats, new = asyncio.run(scenario())
    assert took < 1.0
    assert tuple(stats["remote"]) == new and stats["address_moves"] == 1


def test_envelopes_from_a_host_that_is_not_a_relay_are_dropped(stack):
    _, transceiver = stack
    before = transceiver.stats()["counters"].get("drop_not_a_relay", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.5", 0))  # loopback, but not in --relays 127.0.0.1/32
        for data in (envelope.pack(("198.51.100.1", 9), b"\x80" + bytes(40)), b"junk"):
            stranger.sendto(data, transceiver.internal)
    wait_for(
        lambda: transceiver.stats()["counters"].get("drop_not_a_relay", 0) == before + 2,
        5,
        what="the stranger's datagrams counted",
    )
    counters = transceiver.stats()["counters"]
    assert not [k for k in counters if k.startswith("drop_envelope")]  # never parsed


def test_offers_that_never_connect_free_the_cap_within_seconds(stack):
    _, transceiver = stack

    async def scenario():
        async with aiohttp.ClientSession() as http:

            async def post(i: int) -> int:
                async with http.post(
                    transceiver.url + "/v1/sessions",
                    data=offer(60000 + i),
                    headers={"Content-Type": "application/sdp"},
                ) as r:
                    return r.status

            statuses = [await post(i) for i in range(MAX_SESSIONS + 1)]
            loop = asyncio.get_running_loop()
            full_at = loop.time()
            while await post(99) != 201:
                assert loop.time() - full_at < CONNECT_TIMEOUT + 3, "the cap never freed up"
                await asyncio.sleep(0.25)
            return statuses, loop.time() - full_at

    statuses, freed_after = asyncio.run(scenario())
    assert statuses[-1] == 503 and statuses.count(201) <= MAX_SESSIONS
    assert freed_after < CONNECT_TIMEOUT + 2
    assert transceiver.stats()["closed"].get("never-connected", 0) >= statuses.count(201)


def _worker_of(relay: RelayProcess, send) -> int:
    """The relay worker that receives what `send()` sends to its public port (SO_REUSEPORT
    hashes each source port to one worker): a junk datagram, seen in that worker's drops."""

    def drops() -> list[int]:
        workers = relay.stats()["workers"]
        return [sum(v for k, v in w["counters"].items() if k.startswith("drop_")) for w in workers]

    before = drops()
    send(b"\xff\xff\xff\xff")  # no protocol at all: dropped and counted by its worker
    after = wait_for(lambda: (d := drops()) != before and d, 5, what="a worker to count the probe")
    (index,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    return index


def _port_on_another_worker(relay: RelayProcess, worker: int) -> socket.socket:
    """A bound UDP socket whose datagrams the relay hands to a worker other than `worker`."""
    for _ in range(30):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        if _worker_of(relay, lambda data, s=sock: s.sendto(data, relay.public)) != worker:
            return sock
        sock.close()
    raise AssertionError("30 ports in a row hashed to the same relay worker")


def test_a_rebinding_to_another_relay_worker_after_the_token_window_is_heard(tmp_path):
    """The relay lets a token open flows only within its first-use window or where it is in
    use. A NAT rebinding later in the call lands on whichever relay worker SO_REUSEPORT hashes
    the new port to; here, deliberately, one that never saw the token: it must still get
    through within a second."""
    with (
        RelayProcess(tmp_path / "state", workers=2, extra=["--token-window", "1"]) as relay,
        TransceiverProcess(relay) as transceiver,
    ):

        async def scenario():
            async with aiohttp.ClientSession() as http:
                call = ClientCall(Certificate.generate())
                await call.connect(http, transceiver.url, CallOptions(config=BRISK))
                await asyncio.wait_for(call.secure, 5)
                talking = asyncio.create_task(stream(call))
                try:
                    await asyncio.sleep(1.5)  # past the token's first-use window
                    assert call.transport is not None
                    send = call.transport.sendto
                    first = await asyncio.to_thread(
                        _worker_of, relay, lambda data: send(data, relay.public)
                    )
                    sock = await asyncio.to_thread(_port_on_another_worker, relay, first)
                    await call.rebind(sock)
                    heard = call.rtp_received
                    return await wait_until(lambda: call.rtp_received > heard + 3, 1.0)
                finally:
                    talking.cancel()
                    await call.hang_up(http)
                    call.close()

        assert asyncio.run(scenario()) < 1.0
