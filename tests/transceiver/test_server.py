"""TransceiverServer without sockets: envelopes in through `datagram_received`, a transport
that records `sendto`, client-role Sessions on the other side."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from voicerelay.transceiver import sdp
from voicerelay.transceiver import server as server_module
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.rtp import RtpPacket, parse_rtp
from voicerelay.transceiver.server import TransceiverServer
from voicerelay.transceiver.session import SECURE, RtpReceived, Session
from voicerelay.wire import envelope, stun
from voicerelay.wire.token import TokenKeys

RELAY_A, RELAY_B = ("127.0.0.1", 40001), ("127.0.0.2", 40002)  # inside the default --relays


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


def new_server() -> TransceiverServer:
    server = TransceiverServer(
        TransceiverConfig(), TokenKeys({0: os.urandom(32)}, 0), Certificate.generate()
    )
    server.connection_made(RecordingTransport())  # type: ignore[arg-type]
    return server


class Caller:
    """A client-role Session speaking envelopes to the server through a pretend relay."""

    def __init__(
        self,
        server: TransceiverServer,
        port: int,
        *,
        certificate: Certificate | None = None,
        advertised: str | None = None,
    ) -> None:
        self.server = server
        self.addr = ("198.51.100.7", port)
        self.relay = RELAY_A
        certificate = certificate or Certificate.generate()
        offer = sdp.build_offer(
            ice_ufrag=f"u{port}",
            ice_pwd="p" * 22,
            fingerprint=advertised or certificate.fingerprint,
            ssrc=port,
            cname="test",
        )
        self.call_id, answer_text = server.create_session(offer)
        answer = sdp.parse_answer(answer_text)
        self.session = Session(
            ice_role="controlling",
            local_ufrag=f"u{port}",
            local_pwd="p" * 22,
            remote_ufrag=answer.ice_ufrag,
            remote_pwd=answer.ice_pwd,
            dtls_role="client",
            certificate=certificate,
            remote_fingerprint=answer.fingerprint,
            now=time.monotonic(),
            remote_addr=answer.candidate,
            ssrc=port,
        )
        self.relay_public = answer.candidate  # where the client believes the server is
        self.answer = answer
        self.ufrag = f"u{port}"
        self.echoes: list[RtpPacket] = []
        self.replies: list[tuple[bytes, tuple]] = []  # envelopes for us, as sent

    @property
    def server_session(self) -> Session:
        return self.server.calls[self.call_id].session

    def pump(self, rounds: int = 20) -> None:
        """Move datagrams both ways until both sides are quiet."""
        transport = self.server.transport
        for _ in range(rounds):
            sent = self.session.datagrams_to_send()
            for data, _ in sent:
                self.server.datagram_received(envelope.pack(self.addr, data), self.relay)
            ours = [s for s in transport.sent if envelope.unpack_header(s[0]) == self.addr]
            if not sent and not ours:
                return
            transport.sent = [s for s in transport.sent if s not in ours]
            self.replies += ours
            for data, _ in ours:
                self.session.receive(envelope.unpack(data)[1], self.relay_public, time.monotonic())
            self.session.handle_timer(time.monotonic())
            self.echoes += [
                parse_rtp(e.packet) for e in self.session.events() if isinstance(e, RtpReceived)
            ]

    def check(self) -> None:
        """A fresh consent check from the caller's current address (what a client that moved
        sends next), answered through `pump`."""
        data = stun.build(
            stun.BINDING_REQUEST,
            os.urandom(12),
            [
                (stun.ATTR_USERNAME, f"{self.answer.ice_ufrag}:{self.ufrag}".encode()),
                (stun.ATTR_USE_CANDIDATE, b""),
            ],
            integrity_key=self.answer.ice_pwd.encode(),
        )
        self.server.datagram_received(envelope.pack(self.addr, data), self.relay)
        self.pump()

    def talk(self, count: int, first: int = 0) -> None:
        for i in range(first, first + count):
            packet = RtpPacket(111, i, 960 * i, self.session.ssrc, b"voice-%d" % i, i == first)
            self.session.send_rtp(packet.serialize(), time.monotonic())
            self.pump()


def connected(server: TransceiverServer, port: int = 50000, **kwargs) -> Caller:
    caller = Caller(server, port, **kwargs)
    caller.pump()
    return caller


def run(coro_fn):
    """Run a test body inside an event loop (the server arms its timer on the running loop)."""
    return asyncio.run(coro_fn())


def test_echo_through_the_server_is_the_servers_own_stream():
    async def body():
        server = new_server()
        caller = connected(server)
        assert caller.session.state == SECURE and caller.server_session.state == SECURE
        caller.replies.clear()
        before = server.session_stats(caller.call_id)
        caller.talk(20)
        assert [p.payload for p in caller.echoes] == [b"voice-%d" % i for i in range(20)]
        assert [p.marker for p in caller.echoes] == [True] + [False] * 19
        ours = caller.server_session.ssrc
        assert {p.ssrc for p in caller.echoes} == {ours} != {caller.session.ssrc}
        seqs = [p.sequence for p in caller.echoes]
        assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
        stamps = [p.timestamp for p in caller.echoes]
        assert all((b - a) & 0xFFFFFFFF == 960 for a, b in zip(stamps, stamps[1:], strict=False))
        header = envelope.pack_header(caller.addr)
        assert all(d.startswith(header) and to == RELAY_A for d, to in caller.replies)
        after = server.session_stats(caller.call_id)
        grew = {k: after[k] - before[k] for k in ("rtp_in", "rtp_out", "packets_in", "packets_out")}
        assert grew == {"rtp_in": 20, "rtp_out": 20, "packets_in": 20, "packets_out": 20}
        assert after["received"] == 20 and after["lost"] == 0
        sent = sum(len(d) - envelope.HEADER_SIZE for d, _ in caller.replies)
        assert after["bytes_out"] - before["bytes_out"] == sent

    run(body)


def test_media_leaves_the_timer_alone():
    async def body():
        server = new_server()
        caller = connected(server)
        call = server.calls[caller.call_id]
        timer = call.timer
        caller.talk(10)
        assert len(caller.echoes) == 10
        assert call.timer == timer == caller.server_session.next_timer()

    run(body)


def test_replies_follow_the_relay_worker_the_client_used_last():
    async def body():
        server = new_server()
        caller = connected(server)
        caller.talk(2)
        caller.relay = RELAY_B  # the relay worker changed (restart, another worker)
        caller.replies.clear()
        caller.talk(2, first=2)
        assert len(caller.echoes) == 4
        assert {to for _, to in caller.replies} == {RELAY_B}
        assert server.calls[caller.call_id].relay_for == {caller.addr: RELAY_B}

    run(body)


def test_bad_envelopes_are_counted_and_the_header_cache_stays_bounded(monkeypatch):
    async def body():
        monkeypatch.setattr(server_module, "CLIENT_CACHE_LIMIT", 4)
        server = new_server()
        caller = connected(server)
        good = envelope.pack(caller.addr, b"\x80\x6f" + bytes(20))
        for data in (good[:10], b"XX" + good[2:], good[:2] + b"\x09" + good[3:]):
            server.datagram_received(data, RELAY_A)
        server.datagram_received(good[: envelope.HEADER_SIZE], RELAY_A)
        for port in range(10):
            server.datagram_received(envelope.pack(("203.0.113.1", port), b"\x80" * 20), RELAY_A)
        counters = server.stats()["counters"]
        assert counters["drop_envelope_short"] == 1 and counters["drop_envelope_magic"] == 1
        assert counters["drop_envelope_version"] == 1 and counters["drop_empty"] == 1
        assert counters["drop_unknown_client"] == 10
        assert server.cached_headers <= 4
        caller.talk(3)  # the known client still gets its echo
        assert len(caller.echoes) == 3

    run(body)


def test_one_context_many_peers_each_checked():
    async def body():
        server = new_server()
        client_cert = Certificate.generate()
        liar = connected(
            server, 50001, certificate=client_cert, advertised=Certificate.generate().fingerprint
        )
        honest = connected(server, 50002, certificate=client_cert)
        assert liar.call_id not in server.calls
        assert server.stats()["closed"] == {"fingerprint-mismatch": 1}
        honest.talk(3)
        assert len(honest.echoes) == 3

    run(body)


@pytest.mark.parametrize("count", [1, 3])
def test_sessions_do_not_see_each_others_media(count):
    async def body():
        server = new_server()
        callers = [connected(server, 51000 + i) for i in range(count)]
        for caller in callers:
            caller.talk(5)
        for caller in callers:
            assert [p.payload for p in caller.echoes] == [b"voice-%d" % i for i in range(5)]
            assert server.session_stats(caller.call_id)["rtp_out"] == 5

    run(body)
