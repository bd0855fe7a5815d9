"""Raw socket addresses: the relay's batched I/O keys flows by the kernel's sockaddr bytes."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.wire.addr import addr_from_sockaddr, canonical, sockaddr

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@given(v4, ports)
def test_ipv4_sockaddr_round_trips_and_matches_what_the_kernel_reports(host, port):
    raw = sockaddr((host, port))
    assert len(raw) == 16
    assert addr_from_sockaddr(raw) == (host, port)


@given(v6, ports)
def test_ipv6_sockaddr_round_trips(host, port):
    raw = sockaddr((host, port), socket.AF_INET6)
    assert len(raw) == 28
    assert addr_from_sockaddr(raw) == canonical((host, port))


@given(v4, ports)
def test_ipv4_on_an_ipv6_socket_is_mapped(host, port):
    assert addr_from_sockaddr(sockaddr((host, port), socket.AF_INET6)) == (f"::ffff:{host}", port)


def test_ipv6_on_an_ipv4_socket_is_refused():
    with pytest.raises(ValueError):
        sockaddr(("::1", 5))


@given(st.binary(max_size=40))
def test_any_bytes_give_an_address_or_value_error(raw):
    try:
        host, port = addr_from_sockaddr(raw)
    except ValueError:
        return
    assert 0 <= port <= 65535 and canonical((host, port)) == (host, port)


def test_sockaddr_equals_the_bytes_the_kernel_writes():
    """What recvmmsg reports for a peer is what `sockaddr` builds, so flows match by bytes."""
    from voicerelay.relay.mmsg import DatagramBatch

    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        tx.sendto(b"x", rx.getsockname())
        rx.settimeout(2)
        batch = DatagramBatch(4, 64, 16)
        n = 0
        while not n:  # the datagram is queued: loopback delivery is synchronous
            n = batch.recv(rx.fileno())
        assert batch.datagram(0) == (b"x", sockaddr(tx.getsockname()))
