"""Batched UDP I/O (recvmmsg/sendmmsg through cffi) over real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.wire.addr import addr_from_sockaddr, sockaddr


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_a_burst_arrives_in_one_batch_with_its_peers(pair):
    a, b = pair
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for i, s in enumerate(senders):
            s.bind(("127.0.0.1", 0))
            s.sendto(bytes([i]) * (i + 1), a.getsockname())
        batch = DatagramBatch(8, 2048, 16)
        assert batch.recv(a.fileno()) == 5
        got = [batch.datagram(i) for i in range(5)]
        assert [d for d, _ in got] == [bytes([i]) * (i + 1) for i in range(5)]
        assert [addr_from_sockaddr(p) for _, p in got] == [s.getsockname() for s in senders]
        assert batch.recv(a.fileno()) == 0  # nothing queued: no block, no error
    finally:
        for s in senders:
            s.close()


def test_sent_batch_reaches_each_peer(pair):
    a, b = pair
    out = DatagramBatch(4, 2048, 16)
    for i in range(3):
        out.put(i, f"to b {i}".encode(), sockaddr(b.getsockname()))
    assert out.send(a.fileno(), 3) == (3, 0)
    assert [b.recvfrom(100) for _ in range(3)] == [
        (f"to b {i}".encode(), a.getsockname()) for i in range(3)
    ]


def test_a_datagram_longer_than_the_slot_shows_by_its_length(pair):
    a, b = pair
    b.sendto(b"x" * 3000, a.getsockname())
    batch = DatagramBatch(2, 1501, 16)
    assert batch.recv(a.fileno()) == 1
    assert len(batch.datagram(0)[0]) == 1501  # truncated: the router drops it as oversize


def test_route_into_forwards_what_the_route_returns(pair):
    a, b = pair
    for payload in (b"keep-1", b"drop", b"keep-2"):
        b.sendto(payload, a.getsockname())
    rx, tx = DatagramBatch(8, 2048, 16), DatagramBatch(8, 2048, 16)
    n = rx.recv(a.fileno())
    target = sockaddr(b.getsockname())

    def route(data: bytes, peer: bytes, now: float) -> tuple[bytes, bytes] | None:
        assert peer == target and now == 7.0
        return None if data == b"drop" else (target, b"[" + data + b"]")

    assert rx.route_into(n, route, tx, 7.0) == 2
    assert tx.send(a.fileno(), 2) == (2, 0)
    assert [b.recv(100) for _ in range(2)] == [b"[keep-1]", b"[keep-2]"]


def test_a_refused_destination_is_skipped_and_the_rest_still_go(pair):
    a, b = pair
    out = DatagramBatch(4, 2048, 16)
    out.put(0, b"first", sockaddr(b.getsockname()))
    out.put(1, b"nowhere", sockaddr(("0.0.0.0", 0)))  # port 0: the kernel refuses it
    out.put(2, b"third", sockaddr(b.getsockname()))
    assert out.send(a.fileno(), 3) == (2, 1)
    assert [b.recv(100) for _ in range(2)] == [b"first", b"third"]


def test_a_batch_that_sent_then_receives_forgets_its_cached_peers(pair):
    """`route_into` skips rewriting a slot's peer when it is the same object as last time; a
    recvmmsg into that batch rewrites the names, so the batch must forget them."""
    a, b = pair
    to_b = sockaddr(b.getsockname())
    src, batch = DatagramBatch(4, 2048, 16), DatagramBatch(4, 2048, 16)
    a.sendto(b"first", b.getsockname())
    n = src.recv(b.fileno())
    assert src.route_into(n, lambda d, p, now: (to_b, d), batch, 0.0) == 1  # caches to_b
    assert batch.send(a.fileno(), 1) == (1, 0)
    assert b.recv(100) == b"first"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.sendto(b"in", a.getsockname())
        assert batch.recv(a.fileno()) == 1  # slot 0's name is now the stranger's
    a.sendto(b"again", b.getsockname())
    n = src.recv(b.fileno())
    assert src.route_into(n, lambda d, p, now: (to_b, d), batch, 0.0) == 1
    assert batch.send(a.fileno(), 1) == (1, 0)
    b.settimeout(1)
    assert b.recv(100) == b"again"
