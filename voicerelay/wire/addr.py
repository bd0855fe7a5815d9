"""IP addresses as the wire carries them: a family (4 or 6) and 16 bytes, IPv4 mapped.

Host strings are canonical as the socket layer prints them (`inet_ntop`), so an address read
from a packet and one reported by a socket compare equal. Recent conversions are cached.
"""

from __future__ import annotations

import socket
import struct
from functools import lru_cache

Addr = tuple[str, int]  # (canonical host, port): the one definition every module imports

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
CACHE_SIZE = 4096  # recent conversions: transceivers stay hot, client churn stays bounded


@lru_cache(maxsize=CACHE_SIZE)
def pack_ip(host: str) -> tuple[int, bytes]:
    """(family, 16 bytes) for a literal IPv4 or IPv6 host; raises ValueError otherwise."""
    try:
        return 4, V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return 6, socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except OSError:
        raise ValueError(f"{host!r} is not an IP address") from None


@lru_cache(maxsize=CACHE_SIZE)
def unpack_ip(family: int, ip16: bytes) -> str:
    """The canonical host string for (family, 16 bytes); raises ValueError on a bad family."""
    if family == 4 and ip16[:12] == V4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, ip16[12:])
    if family == 6 and len(ip16) == 16:
        return socket.inet_ntop(socket.AF_INET6, ip16)
    raise ValueError(f"bad address family {family}")


def canonical(addr: Addr) -> Addr:
    """The same address with its host in canonical form."""
    family, ip16 = pack_ip(addr[0])
    return (unpack_ip(family, ip16), addr[1])


# Raw socket addresses ------------------------------------------------------------------------
# The relay's batched I/O (recvmmsg/sendmmsg) sees peers as the kernel's `struct sockaddr`
# bytes. They key the hot path's flow lookups directly; these convert at the edges.
_SIN = struct.Struct("=H")  # sa_family_t, host byte order
_PORT = struct.Struct("!H")
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


@lru_cache(maxsize=CACHE_SIZE)
def sockaddr(addr: Addr, family: int = socket.AF_INET) -> bytes:
    """`struct sockaddr_in`/`sockaddr_in6` bytes for `addr` on a socket of `family`.

    An IPv4 address on an AF_INET6 socket becomes IPv4-mapped, as the kernel reports it on a
    dual-stack socket. Raises ValueError for an IPv6 address on an AF_INET socket.
    """
    fam, ip16 = pack_ip(addr[0])
    port = _PORT.pack(addr[1])
    if family == socket.AF_INET:
        if fam != 4:
            raise ValueError(f"{addr[0]!r} is not reachable from an IPv4 socket")
        return _SIN.pack(socket.AF_INET) + port + ip16[12:] + bytes(8)
    return _SIN.pack(socket.AF_INET6) + port + bytes(4) + ip16 + bytes(4)


@lru_cache(maxsize=CACHE_SIZE)
def addr_from_sockaddr(raw: bytes) -> Addr:
    """The canonical `Addr` of `struct sockaddr_in`/`sockaddr_in6` bytes; ValueError otherwise."""
    if len(raw) < 8:
        raise ValueError("short sockaddr")
    (family,) = _SIN.unpack_from(raw)
    (port,) = _PORT.unpack_from(raw, 2)
    if family == socket.AF_INET and len(raw) >= SOCKADDR_IN_SIZE:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= SOCKADDR_IN6_SIZE:
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    raise ValueError(f"unsupported sockaddr family {family}")
