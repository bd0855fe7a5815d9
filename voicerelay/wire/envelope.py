"""The envelope between relay and transceiver: a fixed header, then the client's datagram.

`magic 'VR' (2) | version (1) | family (1: 4 or 6) | client port (2) | client IP (16) | payload`
IPv4 client addresses travel IPv4-mapped. One `unpack_from` reads the header.
"""

from __future__ import annotations

import ipaddress
import struct

Addr = tuple[str, int]

MAGIC = b"VR"
VERSION = 1
HEADER = struct.Struct("!2sBBH16s")
HEADER_SIZE = HEADER.size  # 22
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


class EnvelopeError(ValueError):
    """A datagram from the other side is not a valid envelope; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def pack_header(client: Addr) -> bytes:
    """The 22-byte header for a client address (the relay caches it per flow)."""
    host, port = client
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return HEADER.pack(MAGIC, VERSION, 4, port, _V4_PREFIX + ip.packed)
    return HEADER.pack(MAGIC, VERSION, 6, port, ip.packed)


def pack(client: Addr, payload: bytes) -> bytes:
    """A whole envelope."""
    return pack_header(client) + payload


def address_from_fields(family: int, port: int, ip16: bytes) -> Addr:
    """The `Addr` for a header's family/port/IP fields; raises `EnvelopeError`."""
    if family == 4:
        if ip16[:12] != _V4_PREFIX:
            raise EnvelopeError("family")
        return (str(ipaddress.IPv4Address(ip16[12:])), port)
    if family == 6:
        return (str(ipaddress.IPv6Address(ip16)), port)
    raise EnvelopeError("family")


def unpack_header(data: bytes) -> Addr:
    """The client address in an envelope's header; raises `EnvelopeError`."""
    if len(data) < HEADER_SIZE:
        raise EnvelopeError("short")
    magic, version, family, port, ip16 = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("magic")
    if version != VERSION:
        raise EnvelopeError("version")
    return address_from_fields(family, port, ip16)


def unpack(data: bytes) -> tuple[Addr, bytes]:
    """Split an envelope into (client address, client datagram)."""
    return unpack_header(data), bytes(data[HEADER_SIZE:])
