"""The envelope between relay and transceiver: a fixed header, then the client's datagram.

`magic 'VR' (2) | version (1) | family (1: 4 or 6) | client port (2) | client IP (16) | payload`
IPv4 client addresses travel IPv4-mapped. One `unpack_from` reads the header.
"""

from __future__ import annotations

import struct

from voicerelay.wire.addr import Addr, pack_ip, unpack_ip

MAGIC = b"VR"
VERSION = 1
HEADER = struct.Struct("!2sBBH16s")
HEADER_SIZE = HEADER.size  # 22


class EnvelopeError(ValueError):
    """A datagram from the other side is not a valid envelope; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def pack_header(client: Addr) -> bytes:
    """The 22-byte header for a client address (the relay caches it per flow)."""
    family, ip16 = pack_ip(client[0])
    return HEADER.pack(MAGIC, VERSION, family, client[1], ip16)


def pack(client: Addr, payload: bytes) -> bytes:
    """A whole envelope."""
    return pack_header(client) + payload


def address_from_fields(family: int, port: int, ip16: bytes) -> Addr:
    """The `Addr` for a header's family/port/IP fields; raises `EnvelopeError`."""
    try:
        return (unpack_ip(family, ip16), port)
    except ValueError:
        raise EnvelopeError("family") from None


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
