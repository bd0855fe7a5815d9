"""STUN messages (RFC 8489 / RFC 5389): parse, build, integrity and fingerprint.

Pure functions over bytes. `parse` turns any byte string into a `StunMessage` or raises
`StunError`; `binding_server_ufrag` is the relay's fast path, which reads the server ufrag
out of a Binding request without building a message.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field

from voicerelay.wire.addr import Addr

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111
BINDING_INDICATION = 0x0011

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024
ATTR_USE_CANDIDATE = 0x0025
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A

MAX_USERNAME = 513

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_COOKIE_BYTES = _U32.pack(MAGIC_COOKIE)


class StunError(ValueError):
    """A byte string is not a well-formed STUN message; `reason` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class StunMessage:
    """A parsed STUN message: type, transaction id and raw attributes in wire order."""

    msg_type: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, attr: int) -> bytes | None:
        """The value of the first attribute of this type, or None."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def has(self, attr: int) -> bool:
        return any(kind == attr for kind, _ in self.attributes)

    @property
    def username(self) -> str | None:
        value = self.get(ATTR_USERNAME)
        if value is None:
            return None
        return value.decode("utf-8", "replace")

    @property
    def method(self) -> int:
        t = self.msg_type
        return (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)

    @property
    def cls(self) -> int:
        """0 request, 1 indication, 2 success response, 3 error response."""
        t = self.msg_type
        return ((t >> 4) & 0x1) | ((t >> 7) & 0x2)


def _padded(length: int) -> int:
    return (length + 3) & ~3


def parse(data: bytes) -> StunMessage:
    """Parse a STUN message; raises only `StunError`."""
    if len(data) < HEADER_SIZE:
        raise StunError("short", f"{len(data)} bytes")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000 or cookie != MAGIC_COOKIE:
        raise StunError("not-stun")
    if length & 3 or HEADER_SIZE + length != len(data):
        raise StunError("length", f"header says {length}, datagram has {len(data) - HEADER_SIZE}")
    attributes: list[tuple[int, bytes]] = []
    offset = HEADER_SIZE
    end = len(data)
    while offset < end:
        if offset + 4 > end:
            raise StunError("attribute", "truncated attribute header")
        kind, alen = _ATTR_HEADER.unpack_from(data, offset)
        offset += 4
        if offset + alen > end:
            raise StunError("attribute", f"attribute 0x{kind:04x} overruns the message")
        attributes.append((kind, bytes(data[offset : offset + alen])))
        offset += _padded(alen)
    if offset != end:
        raise StunError("attribute", "padding overruns the message")
    return StunMessage(msg_type, bytes(tid), attributes)


def _attr(kind: int, value: bytes) -> bytes:
    return (
        _ATTR_HEADER.pack(kind, len(value)) + value + b"\x00" * (_padded(len(value)) - len(value))
    )


def build(
    msg_type: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Serialize a message; MESSAGE-INTEGRITY (HMAC-SHA1) and FINGERPRINT are appended last."""
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    body = b"".join(_attr(kind, value) for kind, value in attributes)
    if integrity_key is not None:
        # The length covers everything up to and including MESSAGE-INTEGRITY.
        header = _HEADER.pack(msg_type, len(body) + 24, MAGIC_COOKIE, transaction_id)
        mac = hmac.new(integrity_key, header + body, hashlib.sha1).digest()
        body += _attr(ATTR_MESSAGE_INTEGRITY, mac)
    if fingerprint:
        header = _HEADER.pack(msg_type, len(body) + 8, MAGIC_COOKIE, transaction_id)
        crc = (zlib.crc32(header + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _attr(ATTR_FINGERPRINT, _U32.pack(crc))
    return _HEADER.pack(msg_type, len(body), MAGIC_COOKIE, transaction_id) + body


def _find_attribute(data: bytes, wanted: int) -> int:
    """Offset of the header of the first `wanted` attribute, or -1 (data assumed parsed)."""
    offset = HEADER_SIZE
    end = len(data)
    while offset + 4 <= end:
        kind, alen = _ATTR_HEADER.unpack_from(data, offset)
        if kind == wanted:
            return offset
        offset += 4 + _padded(alen)
    return -1


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY (RFC 8489 s14.5) of a whole, well-formed message."""
    try:
        parse(data)
    except StunError:
        return False
    offset = _find_attribute(data, ATTR_MESSAGE_INTEGRITY)
    if offset < 0 or offset + 24 > len(data):
        return False
    kind, alen = _ATTR_HEADER.unpack_from(data, offset)
    if alen != 20:
        return False
    header = bytearray(data[:HEADER_SIZE])
    _U16.pack_into(header, 2, offset + 24 - HEADER_SIZE)
    expected = hmac.new(key, bytes(header) + data[HEADER_SIZE:offset], hashlib.sha1).digest()
    return hmac.compare_digest(expected, data[offset + 4 : offset + 24])


def verify_fingerprint(data: bytes) -> bool:
    """True if the message ends with a FINGERPRINT attribute that matches its CRC."""
    if len(data) < HEADER_SIZE + 8:
        return False
    offset = len(data) - 8
    kind, alen = _ATTR_HEADER.unpack_from(data, offset)
    if kind != ATTR_FINGERPRINT or alen != 4:
        return False
    (value,) = _U32.unpack_from(data, offset + 4)
    return value == (zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def binding_server_ufrag(data: bytes) -> bytes | None:
    """The server ufrag (USERNAME up to ':') of a well-formed Binding request, else None.

    The relay's fast path: a few `unpack_from` calls, no message object. Never raises.
    """
    n = len(data)
    if n < HEADER_SIZE + 8 or data[0] != 0 or data[1] != 1 or data[4:8] != _COOKIE_BYTES:
        return None
    (length,) = _U16.unpack_from(data, 2)
    if length + HEADER_SIZE != n or length & 3:
        return None
    offset = HEADER_SIZE
    while offset + 4 <= n:
        kind, alen = _ATTR_HEADER.unpack_from(data, offset)
        start = offset + 4
        if start + alen > n:
            return None
        if kind == ATTR_USERNAME:
            if alen > MAX_USERNAME:
                return None
            colon = data.find(b":", start, start + alen)
            return bytes(data[start : colon if colon >= 0 else start + alen])
        offset = start + _padded(alen)
    return None


# Attribute codecs ----------------------------------------------------------------------------


def encode_xor_address(addr: Addr, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value for an IPv4 or IPv6 address."""
    host, port = addr
    ip = ipaddress.ip_address(host)
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        xip = int(ip) ^ MAGIC_COOKIE
        return struct.pack("!BBHI", 0, 1, xport, xip)
    mask = int.from_bytes(_COOKIE_BYTES + transaction_id, "big")
    return struct.pack("!BBH", 0, 2, xport) + (int(ip) ^ mask).to_bytes(16, "big")


def decode_xor_address(value: bytes, transaction_id: bytes) -> Addr:
    """Decode XOR-MAPPED-ADDRESS; raises `StunError` on a malformed value."""
    if len(value) < 4:
        raise StunError("attribute", "short address")
    _, family, xport = struct.unpack_from("!BBH", value)
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == 1 and len(value) == 8:
        (xip,) = _U32.unpack_from(value, 4)
        return (str(ipaddress.IPv4Address(xip ^ MAGIC_COOKIE)), port)
    if family == 2 and len(value) == 20:
        mask = int.from_bytes(_COOKIE_BYTES + transaction_id, "big")
        return (str(ipaddress.IPv6Address(int.from_bytes(value[4:], "big") ^ mask)), port)
    raise StunError("attribute", "bad address family or length")


def encode_error_code(code: int, reason: str) -> bytes:
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("attribute", "short ERROR-CODE")
    _, klass, number = struct.unpack_from("!HBB", value)
    return ((klass & 7) * 100 + number, value[4:].decode("utf-8", "replace"))


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def decode_u32(value: bytes) -> int:
    if len(value) != 4:
        raise StunError("attribute", "expected 4 bytes")
    return _U32.unpack(value)[0]


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(value: bytes) -> int:
    if len(value) != 8:
        raise StunError("attribute", "expected 8 bytes")
    return _U64.unpack(value)[0]
