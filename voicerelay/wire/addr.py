"""IP addresses as the wire carries them: a family (4 or 6) and 16 bytes, IPv4 mapped.

Host strings are canonical as the socket layer prints them (`inet_ntop`), so an address read
from a packet and one reported by a socket compare equal. Conversions are cached.
"""

from __future__ import annotations

import socket
from functools import lru_cache

Addr = tuple[str, int]

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@lru_cache(maxsize=65536)
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


@lru_cache(maxsize=65536)
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
