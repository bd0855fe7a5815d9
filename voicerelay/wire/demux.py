"""RFC 7983 demultiplexing of one UDP port by the first byte of a datagram."""

from __future__ import annotations

from enum import Enum


class PacketKind(Enum):
    STUN = "stun"
    DTLS = "dtls"
    RTP = "rtp"  # RTP and RTCP
    UNKNOWN = "unknown"


_TABLE: list[PacketKind] = [PacketKind.UNKNOWN] * 256
for _b in range(0, 4):
    _TABLE[_b] = PacketKind.STUN
for _b in range(20, 64):
    _TABLE[_b] = PacketKind.DTLS
for _b in range(128, 192):
    _TABLE[_b] = PacketKind.RTP


def classify(data: bytes) -> PacketKind:
    """Which protocol a datagram belongs to, by its first byte."""
    return _TABLE[data[0]] if data else PacketKind.UNKNOWN


def is_rtcp(data: bytes) -> bool:
    """True for RTCP under rtcp-mux (RFC 5761: second byte 192..223)."""
    return len(data) >= 2 and 128 <= data[0] <= 191 and 192 <= data[1] <= 223
