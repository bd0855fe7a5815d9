"""The transceiver's batched socket (`BatchedEndpoint`) over real UDP sockets on loopback.

A burst of checks from many clients through several relays is read with recvmmsg and answered
with sendmmsg, a batch at a time (IPv4, IPv6, IPv4 relays on a dual-stack socket); held
datagrams leave in sendmmsg batches; a refused address, an oversize datagram and a full send
buffer are counted, never raised (the full buffer in a network namespace of its own, where a
slow qdisc on its loopback holds what the server sent). Then the `relay.mmsg` helpers the
endpoint uses, and the sockaddr conversions, against what the kernel and `wire.addr` write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.net import bind_udp
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.server import (
    BATCH,
    BatchedEndpoint,
    TransceiverServer,
    peer_address,
    peer_sockaddr,
)
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import sockaddr
from voicerelay.wire.token import TokenKeys

ROOT = Path(__file__).resolve().parents[2]
CERTIFICATE = Certificate.generate()
BURST = 150  # checks queued at once: three batches, within the kernel's default buffer
WITHIN = 5.0  # seconds anything may take to arrive


def ipv6_loopback() -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return True
    return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
# (what the server binds, where its relays send from)
FAMILIES = [
    pytest.param("127.0.0.1", "127.0.0.1", id="ipv4"),
    pytest.param("::1", "::1", id="ipv6", marks=needs_ipv6),
    pytest.param("::", "127.0.0.1", id="ipv4-on-dual-stack", marks=needs_ipv6),
]


@contextlib.contextmanager
def udp_sockets(host: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` non-blocking UDP sockets bound to `host` (the pretend relay workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
            s.setblocking(False)
        yield socks
    finally:
        for s in socks:
            s.close()


def new_server(host: str) -> TransceiverServer:
    return TransceiverServer(
        TransceiverConfig(internal=(host, 0)), TokenKeys({0: os.urandom(32)}, 0), CERTIFICATE
    )


def open_session(server: TransceiverServer) -> tuple[str, str]:
    """A session's (server ufrag, server password), as its answer names them."""
    offer = sdp.build_offer(
        ice_ufrag="cli1",
        ice_pwd="p" * 22,
        fingerprint=CERTIFICATE.fingerprint,
        ssrc=1,
        cname="io",
    )
    _, answer = server.create_session(offer)
    parsed = sdp.parse_answer(answer)
    return parsed.ice_ufrag, parsed.ice_pwd


def check(ufrag: str, pwd: str, transaction_id: bytes) -> bytes:
    """An authenticated Binding request from the client of `open_session`."""
    return stun.build(
        stun.BINDING_REQUEST,
        transaction_id,
        [(stun.ATTR_USERNAME, f"{ufrag}:cli1".encode())],
        integrity_key=pwd.encode(),
    )


def target(server: TransceiverServer, source: str) -> tuple[str, int]:
    """The server's internal port, as a relay sending from `source` reaches it."""
    host, port = server.internal_addr
    return (source if host in ("::", "0.0.0.0") else host, port)


async def receive(socks: list[socket.socket], count: int) -> list[tuple[int, bytes]]:
    """(socket index, datagram) until `count` arrived; fails after `WITHIN` seconds."""
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + WITHIN
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} datagrams arrived"
        for i, s in enumerate(socks):
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append((i, s.recv(4096)))
        await asyncio.sleep(0.005)
    return got


async def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WITHIN
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


# The server on its socket ------------------------------------------------------------------
@pytest.mark.parametrize(("bind", "source"), FAMILIES)
def test_a_burst_from_many_clients_is_answered_a_batch_at_a_time(bind, source):
    async def body() -> None:
        server = new_server(bind)
        await server.start()
        try:
            with udp_sockets(source, 3) as relays:
                ufrag, pwd = open_session(server)
                sent = {}
                for i in range(BURST):  # all queued before the server reads any
                    client = (f"198.51.{i % 3}.{i % 250 + 1}", 40000 + i)
                    tid = os.urandom(12)
                    relays[i % 3].sendto(
                        envelope.pack(client, check(ufrag, pwd, tid)), target(server, source)
                    )
                    sent[tid] = (i % 3, client)
                answers = await receive(relays, BURST)
            answered = {}
            for index, data in answers:
                client, payload = envelope.unpack(data)
                message = stun.parse(payload)
                assert message.msg_type == stun.BINDING_SUCCESS
                answered[message.transaction_id] = (index, client)
            assert answered == sent  # each client answered, through the relay it came by
            batches = math.ceil(BURST / BATCH)
            counters = server.counters
            assert counters["batches_in"] == batches == counters["batches_out"]
            assert not [k for k in counters if k.startswith(("drop_", "send_", "socket_"))]
            assert not counters["internal_errors"]
        finally:
            server.close()

    asyncio.run(body())


@pytest.mark.parametrize(("bind", "source"), FAMILIES)
def test_relays_are_recorded_as_the_socket_reports_them(bind, source):
    async def body() -> None:
        server = new_server(bind)
        await server.start()
        try:
            with udp_sockets(source, 1) as (relay,):
                ufrag, pwd = open_session(server)
                client = ("203.0.113.9", 5000)
                relay.sendto(
                    envelope.pack(client, check(ufrag, pwd, os.urandom(12))), target(server, source)
                )
                await receive([relay], 1)
                (call,) = server.calls.values()
                host, port = relay.getsockname()[:2]
                expected = relay.getsockname() if ":" not in bind else (host, port, 0, 0)
                if bind == "::":
                    expected = (f"::ffff:{host}", port, 0, 0)  # IPv4-mapped, as uvloop says
                assert call.relay_for == {client: expected}
        finally:
            server.close()

    asyncio.run(body())


def test_an_oversize_datagram_is_counted_and_its_batch_goes_on():
    async def body() -> None:
        server = new_server("127.0.0.1")
        await server.start()
        try:
            with udp_sockets("127.0.0.1", 1) as (relay,):
                ufrag, pwd = open_session(server)
                client = ("203.0.113.9", 5000)
                relay.sendto(b"VR" + bytes(3000), server.internal_addr)  # no relay sends this
                relay.sendto(
                    envelope.pack(client, check(ufrag, pwd, os.urandom(12))),
                    target(server, "127.0.0.1"),
                )
                ((_, answer),) = await receive([relay], 1)
            assert envelope.unpack_header(answer) == client
            assert server.counters["drop_oversize"] == 1
            assert server.counters["batches_in"] == 1
        finally:
            server.close()

    asyncio.run(body())


# The endpoint alone ---------------------------------------------------------------------------
def test_held_datagrams_leave_in_batches_and_a_refused_address_is_counted():
    async def body() -> None:
        counters: Counter[str] = Counter()
        endpoint = BatchedEndpoint(
            bind_udp("127.0.0.1", 0, reuse_port=False), lambda *_: None, counters
        )
        endpoint.start(asyncio.get_running_loop())
        try:
            with udp_sockets("127.0.0.1", 1) as (peer,):
                endpoint.hold()
                endpoint.queue.extend((b"%d" % i, peer.getsockname()) for i in range(100))
                endpoint.queue.insert(50, (b"refused", ("127.0.0.1", 0)))  # port 0: EINVAL
                with pytest.raises(BlockingIOError):
                    peer.recv(100)  # held: nothing has left (loopback would have it by now)
                endpoint.flush()
                got = await receive([peer], 100)
            assert [d for _, d in got] == [b"%d" % i for i in range(100)]
            assert counters == {"batches_out": 2, "send_failed": 1}  # 101 = 64 + 37
            assert not endpoint.holding and not endpoint.queue
        finally:
            endpoint.close()

    asyncio.run(body())


# A full send buffer, for real: a namespace whose loopback holds what is sent -----------------
def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace needs root"
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    if probe.returncode:
        return f"unshare --net failed: {probe.stderr.decode().strip()}"
    return None


async def full_send_buffer_run() -> dict[str, Any]:
    """Inside a fresh network namespace: a burst of checks queued at the server, then a slow
    token bucket on loopback and a small send buffer, so sendmmsg meets EAGAIN; then the
    qdisc goes and one more check is answered. Returns what happened."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = new_server("127.0.0.1")
    await server.start()
    assert server.endpoint is not None
    server.endpoint.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    burst = 150
    try:
        with udp_sockets("127.0.0.1", 1) as (relay,):
            ufrag, pwd = open_session(server)
            for i in range(burst):
                data = envelope.pack(("203.0.113.9", 6000 + i), check(ufrag, pwd, os.urandom(12)))
                relay.sendto(data, server.internal_addr)
            qdisc = "tc qdisc add dev lo root tbf rate 1mbit burst 1600 latency 1s"
            added = subprocess.run(qdisc.split(), capture_output=True, text=True)
            if added.returncode:
                return {"skip": f"{qdisc}: {added.stderr.strip()}"}
            counters = server.counters
            answered = 0
            deadline = time.monotonic() + WITHIN
            while answered + counters["send_failed"] < burst and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        relay.recv(4096)
                        answered += 1
                await asyncio.sleep(0.01)
            failed = counters["send_failed"]
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=True)
            data = envelope.pack(("203.0.113.9", 5999), check(ufrag, pwd, os.urandom(12)))
            relay.sendto(data, server.internal_addr)
            after = await receive([relay], 1)
            return {
                "burst": burst,
                "answered": answered,
                "send_failed": failed,
                "answered_after": len(after),
                "internal_errors": counters["internal_errors"],
            }
    finally:
        server.close()


def test_a_full_send_buffer_is_counted_not_raised():
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    code = (
        "import asyncio, json\n"
        "from tests.transceiver.test_server_io import full_send_buffer_run\n"
        "print(json.dumps(asyncio.run(full_send_buffer_run())))\n"
    )
    run = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["send_failed"] > 0, result  # the kernel refused some: counted
    assert result["answered"] + result["send_failed"] == result["burst"], result
    assert result["answered_after"] == 1 and result["internal_errors"] == 0, result


# The batch helpers (relay.mmsg) the endpoint uses -----------------------------------------
def test_received_gives_every_datagram_with_its_peer():
    with udp_sockets("127.0.0.1", 1) as (sink,), udp_sockets("127.0.0.1", 3) as senders:
        for i, s in enumerate(senders):
            s.sendto(bytes([i]) * (i + 1), sink.getsockname())
        batch = DatagramBatch(8, 2048, 16)
        n = batch.recv(sink.fileno())
        assert n == 3
        assert batch.received(n) == [batch.datagram(i) for i in range(n)]
        assert [peer_address(p) for _, p in batch.received(n)] == [s.getsockname() for s in senders]


def test_put_all_fills_slots_to_each_peer_and_leaves_out_what_does_not_fit():
    with udp_sockets("127.0.0.1", 3) as (out, a, b):
        peers = {"a": sockaddr(a.getsockname()), "b": sockaddr(b.getsockname())}
        batch = DatagramBatch(4, 16, 16)
        items = [(b"to a", "a"), (b"x" * 17, "a"), (b"to b", "b"), (b"a again", "a")]
        assert batch.put_all(items, peers) == (3, 1)
        assert batch.send(out.fileno(), 3) == (3, 0)
        assert [a.recv(100), a.recv(100), b.recv(100)] == [b"to a", b"a again", b"to b"]
        assert batch.put_all([(b"to b", "b")] * 9, peers) == (4, 0)  # at most `size`
        with pytest.raises(KeyError):
            batch.put_all([(b"nowhere", "c")], peers)


# Socket addresses -----------------------------------------------------------------------------
ports = st.integers(0, 65535)


@given(st.ip_addresses(v=4), ports)
def test_an_ipv4_peer_converts_both_ways_as_the_kernel_writes_it(ip, port):
    raw = peer_sockaddr((str(ip), port), socket.AF_INET)
    assert raw == sockaddr((str(ip), port), socket.AF_INET)
    assert peer_address(raw) == (str(ip), port)
    mapped = peer_sockaddr((str(ip), port), socket.AF_INET6)  # an IPv4 relay, dual stack
    assert mapped == sockaddr((str(ip), port), socket.AF_INET6)
    assert peer_address(mapped) == (f"::ffff:{ip}", port, 0, 0)


@given(st.ip_addresses(v=6), ports, st.integers(0, (1 << 20) - 1), st.integers(0, (1 << 32) - 1))
def test_an_ipv6_peer_converts_both_ways_with_flow_and_scope(ip, port, flowinfo, scope_id):
    host = socket.inet_ntop(socket.AF_INET6, ip.packed)  # how a socket prints it
    raw = peer_sockaddr((host, port, flowinfo, scope_id), socket.AF_INET6)
    assert len(raw) == 28
    assert peer_address(raw) == (host, port, flowinfo, scope_id)
    if not flowinfo and not scope_id:
        assert raw == sockaddr((host, port), socket.AF_INET6)
