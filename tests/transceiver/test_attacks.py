"""Attacks on a call and on the transceiver's internal port (issue 11), each refused and counted.

Sans-IO first (a client- and a server-role Session back to back on a fake clock, with a tap on
the wire and an attacker beside it), then the server shell (envelopes through
`datagram_received`, and real UDP sockets on loopback for who may send envelopes at all).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transceiver.conftest import CLIENT, SERVER, Pair
from tests.transceiver.test_server import (
    RELAY_A,
    RELAY_B,
    Caller,
    RecordingTransport,
    connected,
    new_server,
    run,
)
from voicerelay.config import ConfigError
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.ice import REPLAY_MEMORY, IceLite
from voicerelay.transceiver.rtp import RtpPacket, parse_rtp
from voicerelay.transceiver.server import MAX_CLIENT_ADDRESSES, SessionLimit, TransceiverServer
from voicerelay.transceiver.session import (
    CLOSED,
    SECURE,
    AddressChanged,
    AddressChecked,
    RtpReceived,
    Session,
    SessionConfig,
)
from voicerelay.transceiver.signaling import make_app
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import Addr
from voicerelay.wire.token import TokenKeys

ATTACKER = ("203.0.113.66", 4444)
REBOUND = ("198.51.100.2", 61000)  # the client's NAT gave it a new port


class TappedPair(Pair):
    """A Pair whose client can move (`client_addr`), with a tap on everything the client sent
    and an inbox for whatever the server sends anywhere else (an attacker's, say)."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        super().__init__(config)
        self.client_addr: Addr = CLIENT
        self.tapped: list[bytes] = []
        self.elsewhere: list[tuple[bytes, Addr]] = []

    def step(self, dt: float = 0.01) -> None:
        self.now += dt
        for data, _ in self.client.datagrams_to_send():
            self.tapped.append(data)
            if not self.drop(data, True):
                self.server.receive(data, self.client_addr, self.now)
        self.deliver_from_server()
        for session in (self.client, self.server):
            when = session.next_timer()
            if when is not None and when <= self.now:
                session.handle_timer(self.now)
        self.client_events += self.client.events()
        self.server_events += self.server.events()

    def deliver_from_server(self) -> None:
        for data, addr in self.server.datagrams_to_send():
            if addr != self.client_addr:
                self.elsewhere.append((data, addr))
            elif not self.drop(data, False):
                self.client.receive(data, SERVER, self.now)

    def inject(self, data: bytes, source: Addr) -> None:
        """A datagram from anyone, straight to the server; its replies go where they go."""
        self.server.receive(data, source, self.now)
        self.deliver_from_server()

    def talk(self, packets: int, first: int = 0) -> list[RtpPacket]:
        """Send RTP from the client; returns the echoes that reached it."""
        seen = len(self.client_events)
        for i in range(first, first + packets):
            packet = RtpPacket(111, i, i * 960, 1111, b"voice-%d" % i).serialize()
            self.client.send_rtp(packet, self.now)
            self.step(0.02)
        self.step()
        events = self.client_events[seen:]
        return [parse_rtp(e.packet) for e in events if isinstance(e, RtpReceived)]


def secure(pair: Pair) -> None:
    pair.run_until(lambda: pair.client.state == SECURE and pair.server.state == SECURE)


def nominating_checks(datagrams: list[bytes]) -> list[bytes]:
    """The Binding requests with USE-CANDIDATE among what was tapped."""
    out = []
    for data in datagrams:
        if data and data[0] < 4:
            msg = stun.parse(data)
            if msg.msg_type == stun.BINDING_REQUEST and msg.has(stun.ATTR_USE_CANDIDATE):
                out.append(data)
    return out


def moves(events: list) -> list:
    return [e.addr for e in events if isinstance(e, AddressChanged)]


# A replayed check -------------------------------------------------------------------------------
def test_a_replayed_nominating_check_does_not_take_a_secure_call():
    pair = TappedPair()
    secure(pair)
    assert pair.talk(3)
    captured = nominating_checks(pair.tapped)
    assert captured
    moves_before = moves(pair.server_events)
    for check in (captured[0], captured[-1]):
        pair.inject(check, ATTACKER)  # replayed once, from another address
    pair.step()
    assert pair.elsewhere == []  # not one answer to the replayer
    assert pair.server.stats["remote"] == CLIENT
    assert moves(pair.server_events) == moves_before  # no AddressChanged at all
    assert pair.server.stats["ice_replayed"] == 2
    echoed = pair.talk(10, first=3)
    assert [p.payload for p in echoed] == [b"voice-%d" % i for i in range(3, 13)]


def test_a_replay_while_connecting_does_not_steal_the_nomination():
    pair = TappedPair()
    pair.drop = lambda data, to_server: 19 < data[0] < 64  # DTLS lost: stays "connected"
    pair.run_until(lambda: pair.server.ice.nominated == CLIENT)
    pair.inject(nominating_checks(pair.tapped)[0], ATTACKER)
    assert pair.server.ice.nominated == CLIENT and pair.elsewhere == []
    assert pair.server.stats["ice_replayed"] == 1
    pair.drop = lambda data, to_server: False
    secure(pair)
    assert pair.talk(3)


def test_a_retransmitted_check_is_answered_again_and_changes_nothing():
    pair = TappedPair(SessionConfig(consent_timeout=2.0, consent_interval=0.5))
    secure(pair)
    check = nominating_checks(pair.tapped)[-1]
    consent_before = pair.server.ice.last_check
    pair.now += 1.0
    pair.server.receive(check, CLIENT, pair.now)  # the same transaction, the same address
    ((answer, to),) = pair.server.datagrams_to_send()
    assert to == CLIENT and stun.parse(answer).msg_type == stun.BINDING_SUCCESS
    assert stun.parse(answer).transaction_id == stun.parse(check).transaction_id
    assert pair.server.ice.last_check == consent_before  # a repeat is not fresh consent
    assert pair.server.stats["ice_retransmits"] == 1


def test_the_memory_of_transaction_ids_is_bounded():
    pair = TappedPair(SessionConfig(consent_interval=0.02))
    secure(pair)
    pair.run_until(lambda: pair.server.stats["ice_checks"] > 3 * REPLAY_MEMORY, seconds=30)
    assert len(pair.server.ice.recent) == REPLAY_MEMORY
    assert pair.server.state == SECURE


SOURCES = [CLIENT, REBOUND, ATTACKER]


@settings(max_examples=60, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.booleans(), st.integers(0, 200), st.sampled_from(SOURCES), st.booleans()),
        max_size=150,
    )
)
def test_ice_lite_takes_each_transaction_once(script):
    """Property of the lite agent alone: a check is fresh once (while remembered); a repeat
    is answered only to the address that sent it first and changes nothing; the memory stays
    bounded."""
    ice = IceLite("SRVR", "s" * 22, "CLNT", consent_timeout=30.0, now=0.0)
    tids: list[bytes] = []
    first_from: dict[bytes, Addr] = {}  # where each transaction was last taken as fresh
    for now, (repeat, pick, source, nominate) in enumerate(script):
        tid = tids[pick % len(tids)] if repeat and tids else os.urandom(12)
        tids.append(tid)
        attrs = [(stun.ATTR_USERNAME, b"SRVR:CLNT")]
        if nominate:
            attrs.append((stun.ATTR_USE_CANDIDATE, b""))
        check = stun.build(stun.BINDING_REQUEST, tid, attrs, integrity_key=b"s" * 22)
        before = (ice.nominated, ice.first_valid, ice.last_check)
        remembered = tid in ice.recent
        fresh = ice.handle(check, source, now)
        answers = [to for _, to in ice.datagrams_to_send()]
        assert fresh == (not remembered)
        if remembered:
            assert (ice.nominated, ice.first_valid, ice.last_check) == before
            assert answers == ([source] if source == first_from[tid] else [])
        else:
            first_from[tid] = source
            assert answers == [source] and ice.last_check == now
            assert ice.nominated == (source if nominate else before[0])
        assert len(ice.recent) <= REPLAY_MEMORY


# Moving only on proof -------------------------------------------------------------------------------
def test_a_check_alone_does_not_move_a_secure_call_its_media_does():
    pair = TappedPair(SessionConfig(consent_interval=0.1))
    secure(pair)
    assert pair.talk(2)
    pair.client_addr = REBOUND  # NAT rebinding: checks and media now come from a new port
    checks = pair.server.stats["ice_checks"]
    pair.run_until(lambda: pair.server.stats["ice_checks"] > checks)
    assert pair.server.stats["remote"] == CLIENT  # a fresh, authenticated check moved nothing
    assert AddressChecked(REBOUND) in pair.server_events  # ...but its media may now prove it
    echoed = pair.talk(3, first=2)  # the first SRTP packet from the new port proves it
    assert [p.payload for p in echoed] == [b"voice-2", b"voice-3", b"voice-4"]
    assert pair.server.stats["remote"] == REBOUND and moves(pair.server_events)[-1] == REBOUND
    assert pair.server.counters["address_moves"] == 1


async def stream(call: ClientCall) -> None:
    """20 ms audio packets until cancelled."""
    for i in itertools.count():
        call.send_audio(b"voice", 960 * i)
        await asyncio.sleep(0.02)


async def wait_until(predicate, within: float) -> float:
    """Poll `predicate` on this loop; the seconds it took (fails after `within`)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        assert loop.time() - started < within, "not within the deadline"
        await asyncio.sleep(0.005)
    return loop.time() - started


def test_a_client_that_moves_to_a_new_port_is_heard_again_within_a_second():
    """A real ClientCall on real sockets whose socket is swapped mid-call (a NAT rebinding):
    its next consent check and its media come from the new port, and the echo follows."""

    async def body():
        server = TransceiverServer(
            TransceiverConfig(internal=("127.0.0.1", 0)), TokenKeys({0: os.urandom(32)}, 0)
        )
        await server.start()
        runner = web.AppRunner(make_app(server), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        call = ClientCall(Certificate.generate())
        options = CallOptions(
            direct=server.internal_addr, config=SessionConfig(consent_interval=0.25)
        )
        try:
            async with aiohttp.ClientSession() as http:
                await call.connect(http, url, options)
                await asyncio.wait_for(call.secure, 5)
                talking = asyncio.create_task(stream(call))
                await wait_until(lambda: call.rtp_received > 5, 2)
                (served,) = (c.session for c in server.calls.values())
                old = call.local_addr
                await call.rebind()
                new, heard = call.local_addr, call.rtp_received
                assert new != old
                took = await wait_until(
                    lambda: call.rtp_received > heard + 3 and served.stats["remote"] == new,
                    1.0,
                )
                talking.cancel()
                assert took < 1.0 and served.state == SECURE
                assert served.counters["address_moves"] == 1
        finally:
            call.close()
            server.close()
            await runner.cleanup()

    run(body)


def test_forged_or_replayed_media_from_elsewhere_proves_nothing():
    pair = TappedPair()
    secure(pair)
    assert pair.talk(3)
    srtp_sent = [d for d in pair.tapped if 127 < d[0] < 192]
    before = pair.server.counters["dropped_wrong_address"]
    for data in (srtp_sent[0], srtp_sent[-1], b"\x80\x6f" + os.urandom(60)):
        pair.inject(data, ATTACKER)
    assert pair.server.stats["remote"] == CLIENT and pair.elsewhere == []
    assert pair.server.counters["dropped_wrong_address"] == before + 3
    assert pair.server.counters["address_moves"] == 0
    assert len(pair.talk(3, first=3)) == 3


def test_consent_belongs_to_the_media_address_once_secure():
    """Checks from another address (a replay beyond the id memory, or a client that moved but
    sends no media) are answered but do not keep the call alive."""
    quiet = SessionConfig(
        consent_timeout=2.0, consent_interval=0.2, rtcp_first=60, rtcp_interval=60
    )
    pair = TappedPair(quiet)  # no RTCP either: RTCP from the new port would prove it
    secure(pair)
    pair.client_addr = REBOUND
    pair.run_until(lambda: pair.server.state == CLOSED, seconds=3)
    assert pair.server.close_reason == "consent-expired"
    assert pair.server.stats["ice_checks"] > 5  # they were answered all along


def test_dtls_application_data_from_a_new_address_proves_it():
    pair = TappedPair()
    secure(pair)
    conn = pair.client.dtls.conn  # pyOpenSSL's own API: one record of application data
    conn.send(b"hello")
    record = conn.bio_read(4096)
    pair.inject(record, REBOUND)
    assert pair.server.stats["remote"] == REBOUND
    assert pair.server.counters["address_moves"] == 1


def test_the_client_role_never_follows_media_from_elsewhere():
    pair = TappedPair()
    secure(pair)
    pair.server.send_rtp(RtpPacket(111, 1, 960, 4242, b"x").serialize(), pair.now)
    ((data, _),) = pair.server.datagrams_to_send()
    pair.client.receive(data, ATTACKER, pair.now)
    assert pair.client.counters["dropped_wrong_address"] == 1
    assert pair.client.stats["remote"] == SERVER


actions = st.lists(
    st.one_of(
        st.tuples(st.just("talk"), st.integers(1, 3)),
        st.tuples(st.just("wait"), st.integers(1, 30)),
        st.tuples(st.just("replay"), st.integers(0, 10_000), st.sampled_from([ATTACKER, CLIENT])),
        st.tuples(st.just("junk"), st.binary(min_size=1, max_size=80)),
        st.tuples(st.just("rebind"), st.integers(1, 3)),
    ),
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=actions)
def test_whatever_an_attacker_replays_media_follows_only_the_client(script):
    """Property: the server's media address is always one the client really used, the attacker
    never gets a datagram, and the client's audio comes back at the end."""
    pair = TappedPair(SessionConfig(consent_interval=0.1))
    secure(pair)
    used = {CLIENT}
    seq = 0
    for action in script:
        kind = action[0]
        if kind == "talk":
            pair.talk(action[1], first=seq)
            seq += action[1]
        elif kind == "wait":
            for _ in range(action[1]):
                pair.step()
        elif kind == "replay":
            pair.inject(pair.tapped[action[1] % len(pair.tapped)], action[2])
        elif kind == "junk":
            pair.inject(action[1], ATTACKER)
        else:
            pair.client_addr = ("198.51.100.2", 61000 + action[1])
            used.add(pair.client_addr)
        assert pair.server.stats["remote"] in used
        assert not [d for d, to in pair.elsewhere if to == ATTACKER]
    assert pair.server.state == SECURE
    assert len(pair.talk(5, first=seq)) == 5
    assert pair.server.stats["remote"] == pair.client_addr


# Sessions that never connect -------------------------------------------------------------------
def lite_session(config: SessionConfig) -> Session:
    return Session(
        ice_role="lite",
        local_ufrag="SRVR",
        local_pwd="s" * 22,
        remote_ufrag="CLNT",
        remote_pwd="c" * 22,
        dtls_role="server",
        certificate=Certificate.generate(),
        remote_fingerprint=Certificate.generate().fingerprint,
        now=100.0,
        config=config,
    )


def test_a_session_nobody_calls_closes_at_the_connect_deadline():
    session = lite_session(SessionConfig(connect_timeout=10.0))
    assert session.next_timer() == 110.0
    session.handle_timer(109.9)
    assert session.state != CLOSED
    session.handle_timer(110.0)
    assert session.state == CLOSED and session.close_reason == "never-connected"


def test_ice_without_dtls_is_not_connected_either():
    pair = Pair(SessionConfig(connect_timeout=3.0, consent_interval=0.5))
    pair.drop = lambda data, to_server: 19 < data[0] < 64  # checks pass, DTLS never does
    pair.run_until(lambda: pair.server.state == CLOSED, seconds=4)
    assert pair.server.close_reason == "never-connected" and pair.now >= 3.0


def test_a_connected_call_outlives_the_connect_window():
    pair = Pair(SessionConfig(connect_timeout=1.0, consent_interval=0.5))
    secure(pair)
    pair.run_until(lambda: not pair.now < 5, seconds=6)
    assert pair.server.state == SECURE


# The internal port -------------------------------------------------------------------------------
def test_envelopes_from_a_non_relay_are_dropped_before_anything_is_read():
    async def body():
        server = new_server()
        caller = connected(server)
        caller.talk(1)
        session_in = caller.server_session.packets_in
        headers = server.cached_headers
        stranger = ("192.0.2.200", 4000)
        caller.session.send_rtp(RtpPacket(111, 9, 9, 1, b"x").serialize(), time.monotonic())
        ((srtp, _),) = caller.session.datagrams_to_send()
        for data in (envelope.pack(caller.addr, srtp), b"x", envelope.pack(("1.2.3.4", 5), b"")):
            server.datagram_received(data, stranger)
        counters = server.stats()["counters"]
        assert counters["drop_not_a_relay"] == 3
        assert not [k for k in counters if k.startswith("drop_") and k != "drop_not_a_relay"]
        assert caller.server_session.packets_in == session_in
        assert server.cached_headers == headers

    run(body)


def test_a_relay_is_repointed_only_by_what_the_session_authenticated():
    async def body():
        server = new_server()
        caller = connected(server)
        sent: list[bytes] = []
        pump_out = caller.session.datagrams_to_send

        def tap() -> list:
            out = pump_out()
            sent.extend(d for d, _ in out)
            return out

        caller.session.datagrams_to_send = tap  # type: ignore[method-assign]
        caller.talk(2)
        call = server.calls[caller.call_id]
        assert call.relay_for == {caller.addr: RELAY_A}
        srtp = [d for d in sent if 127 < d[0] < 192]
        wrong_check = stun.build(
            stun.BINDING_REQUEST,
            os.urandom(12),
            [(stun.ATTR_USERNAME, call.ufrag + b":u50000")],
            integrity_key=b"not the password",
        )
        fakes = [
            b"\x80\x6f" + os.urandom(40),  # SRTP that does not unprotect
            srtp[0],  # SRTP replayed
            wrong_check,  # STUN without the right integrity
            bytes([23, 254, 253]) + os.urandom(40),  # a DTLS record nobody could have sealed
        ]
        for fake in fakes:
            server.datagram_received(envelope.pack(caller.addr, fake), RELAY_B)
            assert call.relay_for == {caller.addr: RELAY_A}, fake[:4]
        caller.relay = RELAY_B  # now the client really comes through the other worker
        caller.replies.clear()
        caller.talk(1, first=2)
        assert call.relay_for == {caller.addr: RELAY_B}
        assert {to for _, to in caller.replies} == {RELAY_B}

    run(body)


def test_only_the_configured_relays_reach_the_transceiver_on_the_wire():
    """Real UDP on loopback: the transceiver accepts 127.0.0.2 only; 127.0.0.1 is a stranger."""

    async def body():
        config = TransceiverConfig(internal=("127.0.0.1", 0), relays=("127.0.0.2/32",))
        server = TransceiverServer(config, TokenKeys({0: os.urandom(32)}, 0))
        await server.start()
        try:
            envelope_data = envelope.pack(("198.51.100.1", 5), b"\x80" + bytes(30))
            for source in ("127.0.0.1", "127.0.0.2"):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                    sender.bind((source, 0))
                    sender.sendto(envelope_data, server.internal_addr)
            deadline = time.monotonic() + 3
            counters = server.counters
            while counters["drop_not_a_relay"] + counters["drop_unknown_client"] < 2:
                assert time.monotonic() < deadline, dict(counters)
                await asyncio.sleep(0.01)
            assert counters["drop_not_a_relay"] == 1  # the stranger, before any parsing
            assert counters["drop_unknown_client"] == 1  # the relay's envelope was read
        finally:
            server.close()

    run(body)


def test_a_call_routes_a_bounded_set_of_addresses_and_leaves_none_behind():
    async def body():
        server = new_server()
        caller = connected(server)
        call = server.calls[caller.call_id]
        for port in range(20):  # a client that keeps moving: a check, then media, from each
            caller.addr = ("198.51.100.7", 40000 + port)
            caller.check()
            caller.talk(1, first=port)
            assert call.media_to == caller.addr
        assert len(caller.echoes) == 20
        assert len(call.clients) <= MAX_CLIENT_ADDRESSES and len(call.relay_for) <= 9
        assert [c for c, owner in server.by_client.items() if owner is call] == list(call.clients)
        server.delete_session(caller.call_id)
        assert server.by_client == {}

    run(body)


def test_an_ipv6_relay_is_remembered_as_the_socket_reports_it():
    async def body():
        server = new_server()
        caller = Caller(server, 50000)
        caller.relay = ("::1", 40001, 0, 0)  # what an AF_INET6 socket reports
        caller.pump()
        caller.talk(2)
        call = server.calls[caller.call_id]
        assert call.relay_for == {caller.addr: ("::1", 40001, 0, 0)} and len(caller.echoes) == 2

    run(body)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"relays": ("10.0.0.0/33",)}, "--relays entry '10.0.0.0/33' is not an IP address"),
        ({"relays": ("",)}, "--relays is empty"),
        ({"relays": "10.0.0.1,,fd00::/8"}, None),
        ({"connect_timeout": 0.1}, "--connect-timeout 0.1 is out of range"),
    ],
)
def test_relay_and_connect_options_fail_in_one_line(options, says):
    if says is None:
        assert TransceiverConfig(**options).relays == ("10.0.0.1/32", "fd00::/8")
        return
    with pytest.raises(ConfigError, match=re.escape(says)):
        TransceiverConfig(**options)


@pytest.mark.parametrize(
    ("relays", "host", "allowed"),
    [
        (("127.0.0.0/8", "::1/128"), "127.5.6.7", True),
        (("127.0.0.0/8", "::1/128"), "::1", True),
        (("127.0.0.0/8", "::1/128"), "::ffff:127.0.0.1", True),  # via a dual-stack socket
        (("127.0.0.0/8", "::1/128"), "10.0.0.1", False),
        (("10.1.0.0/16", "fd00::/8"), "10.1.200.3", True),
        (("10.1.0.0/16", "fd00::/8"), "10.2.0.1", False),
        (("10.1.0.0/16", "fd00::/8"), "fd12::7%eth0", True),
        (("10.1.0.0/16", "fd00::/8"), "fe80::1", False),
        (("192.0.2.7",), "192.0.2.7", True),
        (("192.0.2.7",), "192.0.2.8", False),
    ],
)
def test_relay_networks(relays, host, allowed):
    server = TransceiverServer(
        TransceiverConfig(relays=relays), TokenKeys({0: bytes(32)}, 0), Certificate.generate()
    )
    assert server.relay_filter.allows(host) is allowed
    assert (host in server.relay_filter.known) is allowed


# The session cap frees up ---------------------------------------------------------------------
def offer(port: int) -> str:
    return sdp.build_offer(
        ice_ufrag=f"user{port}",
        ice_pwd="p" * 22,
        fingerprint=Certificate.generate().fingerprint,
        ssrc=port,
        cname="x",
    )


def test_sessions_that_never_connect_give_their_place_back():
    async def body():
        config = TransceiverConfig(max_sessions=3, connect_timeout=0.5)
        server = TransceiverServer(config, TokenKeys({0: os.urandom(32)}, 0))
        server.connection_made(RecordingTransport())  # type: ignore[arg-type]
        for port in range(3):
            server.create_session(offer(port))  # anonymous offers, never followed by a call
        with pytest.raises(SessionLimit):
            server.create_session(offer(9))
        started = time.monotonic()
        while server.calls:
            assert time.monotonic() - started < 3, server.stats()
            await asyncio.sleep(0.02)
        assert server.stats()["closed"] == {"never-connected": 3}
        assert time.monotonic() - started < 1.5
        honest = Caller(server, 50100)  # the cap is free again: an honest call connects
        honest.pump()
        assert honest.server_session.state == SECURE

    run(body)
