"""Socket set-up both sides share: UDP sockets with large kernel buffers, free-port checks."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket

from voicerelay.config import ConfigError

log = logging.getLogger("voicerelay.net")

# Room for thousands of queued datagrams, so a short pause of the reader drops nothing; the
# kernel grants at most net.core.rmem_max / wmem_max of it (bind_udp warns when it does).
SOCKET_BUFFER = 4 << 20  # bytes
BUFFERS = (
    (socket.SO_RCVBUF, "receive", "net.core.rmem_max"),
    (socket.SO_SNDBUF, "send", "net.core.wmem_max"),
)


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def granted_buffer(sock: socket.socket, option: int) -> int:
    """The buffer the kernel granted: Linux reports twice the size set (bookkeeping included)."""
    return sock.getsockopt(socket.SOL_SOCKET, option) // 2


def bind_udp(
    host: str, port: int, *, reuse_port: bool, buffer: int = SOCKET_BUFFER
) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port) with `buffer`-byte kernel buffers; one
    warning per process and buffer kind if the kernel grants less."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for option, kind, sysctl in BUFFERS:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, buffer)
        granted = granted_buffer(sock, option)
        if granted < buffer:
            _warn_capped(kind, sysctl, buffer, granted)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


@functools.cache
def _warn_capped(kind: str, sysctl: str, wanted: int, granted: int) -> None:
    log.warning(
        "UDP %s buffers are capped at %d bytes, not %d: a pause in reading can drop datagrams; "
        "raise %s (sysctl -w %s=%d)",
        kind,
        granted,
        wanted,
        sysctl,
        sysctl,
        wanted,
    )


def check_port_free(host: str, port: int, what: str, option: str, *, tcp: bool = False) -> None:
    """Refuse a port someone else holds, in one line naming `option` (for UDP: SO_REUSEPORT
    would silently split traffic with a stranger)."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(family_of(host), kind) as probe:
        if tcp:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"{what} {host}:{port} is in use ({exc.strerror}): choose another with {option}"
            ) from None
