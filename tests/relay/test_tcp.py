"""ICE over TCP at the relay: the RFC 4571 codec and the connection table (properties), the
router's decisions for TCP flows (a real shared-memory table, no sockets), and real relay
workers accepting TCP connections in front of a stand-in transceiver."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import subprocess
import time
import uuid

import psutil
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.support.procs import RELAYCTL, RelayProcess, free_ports, wait_for
from tests.support.standin import StandIn, binding_request
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.relay.router import COUNTER_FIELDS, MAX_DATAGRAM, TCP_COUNTERS, RelayRouter
from voicerelay.relay.tcp import (
    MAX_FRAME,
    WRITE_HIGH,
    ConnectionTable,
    FrameDecoder,
    TcpService,
    TcpSettings,
    frame,
)
from voicerelay.shm.flowtable import FlowTable
from voicerelay.transceiver import sdp
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import sockaddr
from voicerelay.wire.token import TokenKeys, load_keys

# The codec ----------------------------------------------------------------------------------

payloads = st.binary(min_size=1, max_size=MAX_FRAME)
FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)


def raw_frame(size: int, fill: bytes = b"x") -> bytes:
    """A length prefix and `size` bytes, whatever the size (frame() refuses bad ones)."""
    return struct.pack("!H", size) + fill[:1] * size


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    """Feed `stream` cut at `cuts`; checks the decoder's buffer bound after every piece."""
    out: list[bytes] = []
    edges = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    for a, b in zip(edges, edges[1:], strict=False):
        out += decoder.feed(stream[a:b])
        assert decoder.buffered <= decoder.max_frame + 1
    return out


@given(st.lists(payloads, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_frames_come_out_whole_however_the_stream_is_split_or_merged(items, cuts):
    stream = b"".join(frame(p) for p in items)
    decoder = FrameDecoder()
    assert feed_in_pieces(decoder, stream, cuts) == items
    assert decoder.skipped == 0 and decoder.buffered == 0


@given(
    st.lists(
        st.one_of(
            payloads, st.integers(min_value=MAX_FRAME + 1, max_value=4 * MAX_FRAME), st.just(0)
        ),
        max_size=12,
    ),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_oversized_and_empty_frames_are_skipped_unbuffered_and_counted(items, cuts):
    stream = b"".join(frame(i) if isinstance(i, bytes) else raw_frame(i) for i in items)
    decoder = FrameDecoder()
    got = feed_in_pieces(decoder, stream, cuts)
    assert got == [i for i in items if isinstance(i, bytes)]
    assert decoder.skipped == sum(1 for i in items if not isinstance(i, bytes))
    assert decoder.buffered == 0


@given(st.binary(max_size=6000), st.lists(st.integers(min_value=0), max_size=30))
def test_garbage_never_raises_and_splitting_changes_nothing(stream, cuts):
    whole = FrameDecoder()
    frames = whole.feed(stream)
    pieces = FrameDecoder()
    assert feed_in_pieces(pieces, stream, cuts) == frames
    assert all(1 <= len(f) <= MAX_FRAME for f in frames)
    assert (pieces.skipped, pieces.buffered) == (whole.skipped, whole.buffered)


def test_frame_refuses_what_rfc4571_cannot_carry():
    assert frame(b"\x01\x02") == b"\x00\x02\x01\x02"
    for bad in (b"", b"x" * 65536):
        with pytest.raises(ValueError):
            frame(bad)


# The answer's ICE-TCP candidates (sdp.py) -----------------------------------------------------

hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


@given(
    st.lists(
        st.tuples(hosts, st.integers(1, 65535)), min_size=1, max_size=4, unique_by=lambda a: a[0]
    ),
    st.integers(0, 65535),
)
def test_answers_list_a_passive_tcp_candidate_per_address_after_the_udp_ones(addresses, tcp_port):
    offer = sdp.parse_offer(
        sdp.build_offer(
            ice_ufrag="abcd", ice_pwd="p" * 22, fingerprint=FINGERPRINT, ssrc=1, cname="c"
        )
    )
    answer = sdp.build_answer(
        offer,
        ice_ufrag="efgh",
        ice_pwd="q" * 22,
        fingerprint=FINGERPRINT,
        dtls_role="server",
        candidate=addresses,
        ssrc=2,
        cname="s",
        tcp_port=tcp_port,
    )
    expected = [(str(ipaddress.ip_address(h)), tcp_port) for h, _ in addresses] if tcp_port else []
    assert sdp.tcp_candidates(answer) == expected
    assert sdp.parse_answer(answer).candidates == [
        (str(ipaddress.ip_address(h)), p) for h, p in addresses
    ]
    lines = [line for line in answer.splitlines() if line.startswith("a=candidate:")]
    kinds = [line.split()[2] for line in lines]
    assert kinds == ["udp"] * len(addresses) + ["tcp"] * len(expected)  # TCP after UDP
    priorities = [int(line.split()[3]) for line in lines]
    assert priorities == sorted(priorities, reverse=True)  # every UDP one first, in order
    foundations = [line.split()[0] for line in lines]
    assert len(set(foundations)) == len(foundations)


def test_tcp_candidates_takes_only_well_formed_passive_ones():
    answer = "\r\n".join(
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=candidate:1 1 udp 2130706431 192.0.2.1 3478 typ host",
            "a=candidate:2 1 tcp 1520435199 192.0.2.1 443 typ host tcptype passive",
            "a=candidate:3 1 tcp 1520435199 192.0.2.1 9 typ host tcptype active",
            "a=candidate:4 1 tcp 1520435199 name.local 443 typ host tcptype passive",
            "a=candidate:5 1 tcp 1520435199 2001:db8::1 70000 typ host tcptype passive",
            "a=candidate:6 1 TCP 1 2001:db8::1 443 typ host generation 0 tcptype passive",
            "a=candidate:7 1 tcp",
        ]
    )
    assert sdp.tcp_candidates(answer) == [("192.0.2.1", 443), ("2001:db8::1", 443)]
    with pytest.raises(sdp.SdpError):
        sdp.tcp_candidates("not sdp")


# The connection table -----------------------------------------------------------------------

KEYS_ = [bytes([k]) * 16 for k in range(6)]


class ConnectionTableMachine(RuleBasedStateMachine):
    """The table against a plain model: at most `limit` kept, the oldest pending one evicted for
    a newcomer, deadlines and idleness exactly as documented."""

    LIMIT, FIRST, IDLE = 3, 5.0, 30.0

    def __init__(self) -> None:
        super().__init__()
        self.table = ConnectionTable(self.LIMIT, self.FIRST, self.IDLE)
        self.now = 0.0
        self.model: dict[bytes, dict] = {}  # insertion order = open order
        self.counts = dict.fromkeys(self.table.counts, 0)

    @rule(key=st.sampled_from(KEYS_))
    def open(self, key):
        state, evicted = self.table.open(key, self.now)
        self.model.pop(key, None)
        pending = [k for k, m in self.model.items() if not m["routed"]]
        if len(self.model) >= self.LIMIT and not pending:
            assert (state, evicted) == (None, None)
            self.counts["drop_tcp_over_limit"] += 1
            return
        expected_evicted = pending[0] if len(self.model) >= self.LIMIT else None
        assert evicted == expected_evicted
        if evicted is not None:
            del self.model[evicted]
            self.counts["drop_tcp_evicted"] += 1
        assert state is not None and not state.routed
        self.model[key] = {"opened": self.now, "routed": False, "state": state}
        self.counts["tcp_accepted"] += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def route(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.table.route(key)
        self.model[key]["routed"] = True
        assert self.model[key]["state"].routed

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def receive(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.model[key]["state"].last_in = self.now  # what the shell does on every read

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def close(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.table.close(key)
        del self.model[key]

    @rule(dt=st.floats(min_value=0, max_value=40))
    def expire(self, dt):
        self.now += dt
        due = {
            k
            for k, m in self.model.items()
            if (not m["routed"] and self.now - m["opened"] > self.FIRST)
            or (m["routed"] and self.now - m["state"].last_in > self.IDLE)
        }
        got = self.table.expired(self.now)
        assert sorted(got) == sorted(due) and len(got) == len(set(got))
        self.counts["drop_tcp_first_timeout"] += sum(1 for k in due if not self.model[k]["routed"])
        self.counts["tcp_closed_idle"] += sum(1 for k in due if self.model[k]["routed"])
        for key in due:
            del self.model[key]

    @invariant()
    def agrees_with_the_model(self):
        assert len(self.table) == len(self.model) <= self.LIMIT
        assert list(self.table.pending) == [k for k, m in self.model.items() if not m["routed"]]
        assert set(self.table.routed) == {k for k, m in self.model.items() if m["routed"]}
        assert self.table.counts == self.counts


TestConnectionTable = ConnectionTableMachine.TestCase
TestConnectionTable.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# The router's decisions for TCP flows ---------------------------------------------------------

SECRET = os.urandom(32)
KEYS = TokenKeys({0: SECRET}, 0)
T1, T2 = ("127.0.0.1", 5001), ("127.0.0.1", 5002)
CLIENT = ("198.51.100.7", 40000)
WALL = 1_700_000_000.0  # the wall clock at monotonic 0 in these tests


def token(transceiver=T1, issued=WALL) -> str:
    return KEYS.seal(0, transceiver, issued)


def binding(transceiver=T1, issued=WALL, ufrag=None) -> bytes:
    ufrag = ufrag or token(transceiver, issued)
    return stun.build(
        stun.BINDING_REQUEST, os.urandom(12), [(stun.ATTR_USERNAME, f"{ufrag}:c".encode())]
    )


def peer(client=CLIENT) -> bytes:
    return sockaddr(client, socket.AF_INET)


def make_router(table, shard=0, **options) -> RelayRouter:
    return RelayRouter(KEYS, table, shard, wall_offset=WALL, **options)


def counter(router, name) -> int:
    return router.counters()[name]


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-tcp-{uuid.uuid4().hex[:12]}", 2, 64)
    yield t
    t.close()
    t.unlink()


def test_a_tcp_flow_opens_only_from_a_token_binding_and_travels_in_the_udp_envelope(table):
    router = make_router(table)
    no_username = stun.build(stun.BINDING_REQUEST, os.urandom(12), [])
    for first in (b"\x80rtp", b"\x16dtls", no_username):
        assert router.tcp_datagram(first, peer(), 0.0) is None
    assert counter(router, "drop_unknown_flow") == 3
    first = binding(T1)
    assert router.tcp_datagram(first, peer(), 0.0) == (
        sockaddr(T1),
        envelope.pack(CLIENT, first),  # what a UDP client's request becomes, byte for byte
    )
    assert router.tcp_datagram(b"\x80media", peer(), 0.1) == (
        sockaddr(T1),
        envelope.pack(CLIENT, b"\x80media"),
    )
    assert router.tcp_datagram(b"\x17dtls", peer(), 0.1)[0] == sockaddr(T1)
    assert router.tcp_datagram(b"\x40junk", peer(), 0.1) is None  # RFC 7983 rules as for UDP
    assert router.tcp_datagram(b"\x80" * (MAX_DATAGRAM + 1), peer(), 0.1) is None
    assert counter(router, "drop_unknown_protocol") == counter(router, "drop_oversize") == 1
    assert table.lookup(CLIENT) is None  # a connection dies with its worker: not in the table
    assert (counter(router, "flows"), counter(router, "tcp_flows")) == (1, 1)
    assert counter(router, "packets_in") == 3


def test_replies_to_a_tcp_client_wait_for_its_connection_and_only_from_its_transceiver(table):
    router = make_router(table)
    router.tcp_datagram(binding(T1), peer(), 0.0)
    back = envelope.pack(CLIENT, b"\x80back")
    assert router.transceiver_datagram(back, sockaddr(T1), 0.1) is None  # nothing goes by UDP
    assert router.tcp_out == [(peer(), b"\x80back")]
    assert (
        router.transceiver_datagram(envelope.pack(CLIENT, b"\x80spoof"), sockaddr(T2), 0.1) is None
    )
    assert counter(router, "drop_return_wrong_transceiver") == 1
    assert router.tcp_out == [(peer(), b"\x80back")] and counter(router, "packets_out") == 1
    router.tcp_closed(peer())
    router.tcp_out.clear()
    assert router.transceiver_datagram(back, sockaddr(T1), 0.2) is None
    assert router.tcp_out == [] and counter(router, "drop_return_no_flow") == 1
    assert router.tcp_datagram(b"\x80media", peer(), 0.2) is None
    assert (counter(router, "tcp_flows"), counter(router, "drop_unknown_flow")) == (0, 1)


def test_one_address_is_a_udp_flow_or_a_tcp_flow_never_both(table):
    router, other = make_router(table, 0), make_router(table, 1)
    assert router.from_client(binding(T1), CLIENT, 0.0)[0] == T1
    assert router.tcp_datagram(binding(T1), peer(), 0.0) is None
    elsewhere = ("198.51.100.8", 5000)
    assert other.from_client(binding(T1), elsewhere, 0.0)[0] == T1  # another worker's shard
    assert router.tcp_datagram(binding(T1), peer(elsewhere), 0.0) is None
    tcp_client = ("198.51.100.9", 6000)
    assert router.tcp_datagram(binding(T1), peer(tcp_client), 0.0) is not None
    assert router.from_client(binding(T1), tcp_client, 0.1) is None
    assert router.from_client(b"\x80media", tcp_client, 0.1) is None  # nor adopted
    assert counter(router, "drop_address_in_use") == 3
    assert table.lookup(tcp_client) is None


def test_tcp_flows_take_the_same_admission_as_udp(table):
    router = make_router(table, token_window=30.0, token_clients=2, new_flow_burst=3)
    assert router.tcp_datagram(binding(T1, issued=WALL - 60), peer(), 0.0) is None
    assert counter(router, "drop_token_expired") == 1
    shared = token(T1)
    assert router.from_client(binding(ufrag=shared), ("198.51.100.1", 1), 0.0)
    assert router.tcp_datagram(binding(ufrag=shared), peer(("198.51.100.2", 2)), 0.0)
    assert router.tcp_datagram(binding(ufrag=shared), peer(("198.51.100.3", 3)), 0.0) is None
    assert counter(router, "drop_token_clients") == 1  # one count for both transports
    assert router.tcp_datagram(binding(), peer(("198.51.100.4", 4)), 0.0)  # the burst's third
    assert router.tcp_datagram(binding(), peer(("198.51.100.5", 5)), 0.0) is None
    assert counter(router, "drop_rate_limited") == 1
    assert router.tcp_datagram(binding(), peer(("203.0.113.5", 5)), 0.0)  # another prefix


def test_tcp_flows_expire_by_the_udp_rules(table):
    router = make_router(table, idle_timeout=30.0, unanswered_timeout=10.0)
    quiet, answered = peer(("198.51.100.1", 1)), peer(("198.51.100.2", 2))
    router.tcp_datagram(binding(), quiet, 0.0)
    router.tcp_datagram(binding(), answered, 0.0)
    router.transceiver_datagram(
        envelope.pack(("198.51.100.2", 2), b"\x01\x01ok"), sockaddr(T1), 1.0
    )
    router.flush(1.0)
    for _ in range(100):  # media from a client keeps nothing alive
        router.tcp_datagram(b"\x80media", quiet, 9.0)
    assert router.expire_tcp(9.9) == []
    assert router.expire_tcp(10.1) == [quiet]
    assert router.expire_tcp(30.9) == []
    assert router.expire_tcp(31.1) == [answered]
    assert counter(router, "flows_expired") == 2 and router.tcp_by_peer == {}


def test_a_connection_that_comes_back_after_a_restart_is_admitted_by_the_token_mark(table):
    """A worker dies, its connection with it; the client reconnects (from a new port, to any
    worker) with the same token, now older than the token window: in use, so admitted."""
    tok = token(T1, issued=WALL)
    first = make_router(table, 0, token_window=10.0)
    first.tcp_datagram(binding(ufrag=tok), peer(("198.51.100.1", 1)), 0.0)
    first.transceiver_datagram(envelope.pack(("198.51.100.1", 1), b"\x01\x01ok"), sockaddr(T1), 1.0)
    first.flush(1.0)  # marks the token in shared memory
    survivor = make_router(table, 1, token_window=10.0)
    assert survivor.tcp_datagram(binding(ufrag=tok), peer(("198.51.100.1", 2)), 20.0)
    other = FlowTable.create(f"vr-tcp-{uuid.uuid4().hex[:12]}", 1, 64)
    try:  # the same after a relay restart: a new table, no mark
        fresh = make_router(other, 0, token_window=10.0)
        assert fresh.tcp_datagram(binding(ufrag=tok), peer(("198.51.100.1", 3)), 20.0) is None
        assert counter(fresh, "drop_token_expired") == 1
    finally:
        other.close()
        other.unlink()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_no_first_frame_but_a_token_binding_opens_a_tcp_flow(first, second):
    name = f"vr-tcp-{uuid.uuid4().hex[:12]}"
    t = FlowTable.create(name, 1, 16)
    try:
        router = make_router(t)
        assert router.tcp_datagram(first, peer(), 0.0) is None
        assert router.tcp_datagram(second, peer(), 0.0) is None
        assert router.tcp_by_peer == {} and t.count() == 0
    finally:
        t.close()
        t.unlink()


# The service in process: real sockets, one event loop ---------------------------------------


def test_every_tcp_counter_is_published(table):
    service = TcpService(
        make_router(table),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        DatagramBatch(4, 2048, 16),
        TcpSettings("127.0.0.1", 0),
    )
    try:
        assert {*service.counters(), "tcp_flows"} == set(TCP_COUNTERS)
        assert set(TCP_COUNTERS) <= set(COUNTER_FIELDS)
    finally:
        service.close()


def test_replies_to_a_client_that_does_not_read_are_dropped_not_queued(table):
    """A connection's send buffer stops at WRITE_HIGH: past it, replies are counted drops (a
    slow reader cannot make the worker hold its audio), and what arrives is whole frames."""
    router = RelayRouter(KEYS, table, 0, wall_offset=time.time() - time.monotonic())
    sent = 4000  # 1400-byte replies: 5.6 MB, more than the kernel buffers on both sides hold

    async def main() -> tuple[int, int, list[bytes]]:
        loop = asyncio.get_running_loop()
        internal = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        internal.bind(("127.0.0.1", 0))
        service = TcpService(
            router, internal, DatagramBatch(64, 2048, 16), TcpSettings("127.0.0.1", 0)
        )
        await service.start()
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, service.sock.getsockname())
            await loop.sock_sendall(client, frame(binding(T1, issued=time.time())))
            for _ in range(500):
                if router.tcp_by_peer:
                    break
                await asyncio.sleep(0.002)
            key, flow = next(iter(router.tcp_by_peer.items()))
            transport = service.connections[key].transport
            most = 0
            for i in range(sent):
                reply = envelope.pack(flow.client, b"\x80" + i.to_bytes(4, "big") + bytes(1395))
                router.transceiver_datagram(reply, sockaddr(T1), 1.0)
                service.deliver()
                most = max(most, transport.get_write_buffer_size())
            frames, decoder = [], FrameDecoder()
            while len(frames) < sent - service.backpressure_drops:
                data = await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
                if not data:
                    break
                frames += decoder.feed(data)
            return most, service.backpressure_drops, frames
        finally:
            client.close()
            service.close()
            internal.close()

    most, dropped, frames = uvloop.run(main())
    assert most <= WRITE_HIGH + 1402  # never more than the limit and the frame that crossed it
    assert 0 < dropped < sent and len(frames) == sent - dropped
    numbers = [int.from_bytes(f[1:5], "big") for f in frames]
    assert numbers == sorted(numbers) and all(len(f) == 1400 for f in frames)
    assert router.counters()["packets_out"] == sent  # routed: the drops are the connection's


# Real relay workers over TCP ------------------------------------------------------------------


class TcpClient:
    """A blocking client connection to the relay's TCP port, RFC 4571 framing."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addr = self.sock.getsockname()
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []

    def send(self, *datagrams: bytes) -> None:
        self.sock.sendall(b"".join(frame(d) for d in datagrams))

    def receive(self, count: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            self.frames += self.decoder.feed(data)
        got, self.frames = self.frames[:count], self.frames[count:]
        return got

    def closed_by_relay(self, timeout: float = 5.0) -> bool:
        """Did the relay close the connection (FIN or reset) within `timeout`?"""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def listening(relay: RelayProcess) -> bool:
    """Does every worker listen on the relay's TCP port yet? (`relayctl start` returns once
    the launcher answers; its workers may still be binding.)"""
    sockets = psutil.net_connections(kind="tcp")
    count = sum(
        1 for c in sockets if c.status == psutil.CONN_LISTEN and c.laddr.port == relay.tcp_port
    )
    return count == relay.workers


@pytest.fixture(scope="module")
def transceiver():
    standin = StandIn(echo=True).start()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def tcp_relay(tmp_path_factory):
    port = free_ports(1, socket.SOCK_STREAM)
    with RelayProcess(
        tmp_path_factory.mktemp("tcp-relay"), workers=2, extra=["--tcp-port", str(port)]
    ) as proc:
        proc.tcp_port = port
        wait_for(lambda: listening(proc), 10, 0.02, "the workers' TCP port")
        yield proc


def _grown(relay: RelayProcess, before: dict, counter_name: str, by: int) -> bool:
    return relay.stats()["totals"][counter_name] - before["totals"][counter_name] >= by


def test_tcp_clients_reach_the_transceiver_and_hear_it_back(tcp_relay, transceiver):
    keys = load_keys(tcp_relay.secret_file)
    before = tcp_relay.stats()
    clients = [TcpClient(tcp_relay.tcp_port) for _ in range(16)]  # spread over both workers
    try:
        for client in clients:
            client.send(binding_request(keys, transceiver.addr))
        for client in clients:
            wait_for(lambda c=client: transceiver.got(c.addr), 5, what="the first frame")
            assert stun.parse(transceiver.got(client.addr)[0]).username.endswith(":cli1")
            client.send(b"\x80one", b"\x80two")  # merged into one segment
            assert client.receive(2) == [b"E\x80one", b"E\x80two"]
        split = frame(b"\x80split")
        for byte in split:  # one byte per segment
            clients[0].sock.sendall(bytes([byte]))
        assert clients[0].receive(1) == [b"E\x80split"]
        stats = wait_for(  # counters are published every tick
            lambda: (s := tcp_relay.stats())["totals"]["tcp_connections"] == 16 and s,
            5,
            0.05,
            "the connections counted",
        )
        assert stats["totals"]["tcp_flows"] == 16
        assert stats["table_flows"] == before["table_flows"]  # TCP flows stay in their worker
        assert sum(1 for w in stats["workers"] if w["counters"]["tcp_flows"]) == 2
        assert "tcp: 16 connections open, 16 with a flow" in tcp_relay.ctl("stats").stdout
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: tcp_relay.stats()["totals"]["tcp_connections"] == 0, 5, what="closes seen")
    assert tcp_relay.stats()["totals"]["tcp_flows"] == 0


def test_a_connection_whose_first_frame_opens_no_flow_is_closed_and_counted(tcp_relay, transceiver):
    keys = load_keys(tcp_relay.secret_file)
    forged = TokenKeys({0: os.urandom(32)}, 0)
    firsts = {
        "http": b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
        "tls": bytes.fromhex("160301020001") + os.urandom(64),  # a ClientHello's start
        "media first": frame(b"\x80rtp"),
        "no token": frame(stun.build(stun.BINDING_REQUEST, os.urandom(12), [])),
        "forged token": frame(binding_request(forged, transceiver.addr)),
        "empty frame": b"\x00\x00" + frame(binding_request(keys, transceiver.addr)),
    }
    before = tcp_relay.stats()
    for what, data in firsts.items():
        client = TcpClient(tcp_relay.tcp_port)
        try:
            client.sock.sendall(data)
            assert client.closed_by_relay(), what
            assert transceiver.got(client.addr) == [], what
        finally:
            client.close()
    wait_for(
        lambda: _grown(tcp_relay, before, "drop_tcp_rejected", len(firsts)),
        5,
        0.05,
        "rejections counted",
    )
    assert _grown(tcp_relay, before, "drop_bad_token", 1)
    honest = TcpClient(tcp_relay.tcp_port)  # and the port still serves
    try:
        honest.send(binding_request(keys, transceiver.addr), b"\x80after")
        assert honest.receive(1) == [b"E\x80after"]
    finally:
        honest.close()


@pytest.fixture
def small_relay(tmp_path):
    port = free_ports(1, socket.SOCK_STREAM)
    extra = ["--tcp-port", str(port), "--tcp-connections", "2", "--unanswered-timeout", "1"]
    with RelayProcess(tmp_path / "state", workers=1, extra=extra) as proc:
        proc.tcp_port = port
        wait_for(lambda: listening(proc), 10, 0.02, "the worker's TCP port")
        yield proc


def test_a_worker_keeps_its_connection_limit_evicting_those_without_a_flow(small_relay):
    transceiver = StandIn(echo=True).start()
    keys = load_keys(small_relay.secret_file)
    opened: list[TcpClient] = []

    def connect(route: bool) -> TcpClient:
        client = TcpClient(small_relay.tcp_port)
        opened.append(client)
        if route:
            client.send(binding_request(keys, transceiver.addr), b"\x80hi")
            assert client.receive(1) == [b"E\x80hi"]
        return client

    try:
        a, b = connect(True), connect(True)
        refused = connect(False)
        assert refused.closed_by_relay()  # both kept ones have flows: the newcomer goes
        b.close()
        wait_for(lambda: small_relay.stats()["totals"]["tcp_connections"] == 1, 5, what="b gone")
        pending = connect(False)
        wait_for(lambda: small_relay.stats()["totals"]["tcp_connections"] == 2, 5, what="pending")
        newcomer = connect(True)  # the one without a flow gives way
        assert pending.closed_by_relay()
        a.send(b"\x80still")
        assert a.receive(1) == [b"E\x80still"]
        wait_for(
            lambda: (t := small_relay.stats()["totals"])["drop_tcp_evicted"] == 1 and t,
            5,
            0.05,
            "the eviction counted",
        )
        assert small_relay.stats()["totals"]["drop_tcp_over_limit"] == 1
        assert newcomer.receive(0) == []
    finally:
        for client in opened:
            client.close()
        transceiver.close()


def test_a_tcp_flow_its_transceiver_never_answers_is_closed_like_a_udp_one(small_relay):
    silent = StandIn(echo=False).start()  # records, never answers
    keys = load_keys(small_relay.secret_file)
    client = TcpClient(small_relay.tcp_port)
    try:
        client.send(binding_request(keys, silent.addr))
        wait_for(lambda: silent.got(client.addr), 5, what="the first frame")
        opened = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - opened < 5:  # the client's media keeps nothing alive
                client.send(b"\x80media")
                time.sleep(0.05)
        closed = time.monotonic() - opened
        assert 1.0 <= closed <= 3.5  # --unanswered-timeout 1, swept every second
        assert client.closed_by_relay(1)
        wait_for(
            lambda: small_relay.stats()["totals"]["tcp_closed_expired"] == 1, 5, 0.05, "counted"
        )
    finally:
        client.close()
        silent.close()


# One-line refusals ----------------------------------------------------------------------------


def relayctl(state_dir, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(state_dir)}
    return subprocess.run([*RELAYCTL, *args], env=env, capture_output=True, text=True, timeout=30)


def test_a_wrong_or_taken_tcp_port_is_one_line(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        listen = f"127.0.0.1:{free_ports(1)}"
        cases = {
            (
                "start",
                "--listen",
                listen,
                "--tcp-port",
                "70000",
            ): "--tcp-port 70000 is out of range",
            ("start", "--listen", listen, "--tcp-port", str(taken.getsockname()[1])): (
                f"TCP port 127.0.0.1:{taken.getsockname()[1]} is in use"
            ),
            ("start", "--listen", listen, "--tcp-port", "1", "--tcp-connections", "0"): (
                "--tcp-connections 0 is out of range"
            ),
            ("call", "http://127.0.0.1:9", "--tcp", "--play", __file__): "--tcp places the tone",
        }
        for args, line in cases.items():
            result = relayctl(tmp_path, *args)
            assert result.returncode == 2, (args, result.stderr)
            assert line in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
    finally:
        taken.close()
