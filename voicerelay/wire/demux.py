"""RFC 7983 demultiplexing of one UDP port by the first byte of a datagram: the one place the
rule is written down. Hot paths index a 256-byte table by the first byte (`IS_RTP[data[0]]`,
as cheap as one comparison) or test the ranges (`first in RTP_FIRST`); others call `classify`.

    0..3     STUN
    20..63   DTLS
    128..191 RTP and RTCP (RFC 5761 tells them apart by the second byte: `is_rtcp`)

Anything else (ZRTP, TURN channels, junk) is UNKNOWN: nothing this project relays or reads.
"""

from __future__ import annotations

from enum import Enum

STUN_FIRST = range(0, 4)
DTLS_FIRST = range(20, 64)
RTP_FIRST = range(128, 192)  # RTP and RTCP
RTCP_SECOND = range(192, 224)  # payload types 64..95 with the marker bit: RTCP (RFC 5761)


class PacketKind(Enum):
    STUN = "stun"
    DTLS = "dtls"
    RTP = "rtp"  # RTP and RTCP
    UNKNOWN = "unknown"


def _kind(first: int) -> PacketKind:
    if first in STUN_FIRST:
        return PacketKind.STUN
    if first in DTLS_FIRST:
        return PacketKind.DTLS
    if first in RTP_FIRST:
        return PacketKind.RTP
    return PacketKind.UNKNOWN


KIND_BY_FIRST_BYTE: tuple[PacketKind, ...] = tuple(_kind(b) for b in range(256))
"""The kind of a datagram by its first byte (index 0..255)."""

IS_STUN = bytes(b in STUN_FIRST for b in range(256))
IS_DTLS = bytes(b in DTLS_FIRST for b in range(256))
IS_RTP = bytes(b in RTP_FIRST for b in range(256))
"""1 at the first bytes of that kind, else 0: `IS_RTP[data[0]]` for a non-empty datagram."""
IS_RTCP_SECOND = bytes(b in RTCP_SECOND for b in range(256))
"""1 at the second bytes of RTCP: `IS_RTCP_SECOND[data[1]]` for RTP-kind data of 2+ bytes."""


def classify(data: bytes) -> PacketKind:
    """Which protocol a datagram belongs to, by its first byte."""
    return KIND_BY_FIRST_BYTE[data[0]] if data else PacketKind.UNKNOWN


def is_rtcp(data: bytes) -> bool:
    """True for RTCP under rtcp-mux (RFC 5761: second byte 192..223)."""
    return len(data) >= 2 and IS_RTP[data[0]] == 1 and IS_RTCP_SECOND[data[1]] == 1
