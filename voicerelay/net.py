"""Socket set-up both sides share."""

from __future__ import annotations

import contextlib
import socket

SOCKET_BUFFER = 4 << 20  # bytes: a few hundred ms of traffic, so a pause drops nothing


def bind_udp(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port), with large kernel buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock
