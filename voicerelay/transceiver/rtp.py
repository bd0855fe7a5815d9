"""RTP and RTCP codecs (RFC 3550) and receive statistics for receiver reports. Pure code."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RTP_HEADER = struct.Struct("!BBHII")  # v/p/x/cc, m/pt, seq, timestamp, ssrc
RTCP_HEADER = struct.Struct("!BBH")  # v/p/count, packet type, length in words - 1
RTCP_SR, RTCP_RR = 200, 201
REPORT_BLOCK = struct.Struct(
    "!IIIIII"
)  # ssrc, lost(fraction|cumulative), ext seq, jitter, lsr, dlsr


class RtpError(ValueError):
    """Malformed RTP or RTCP."""


@dataclass
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: list[int] = field(default_factory=list)
    extension: tuple[int, bytes] | None = None  # (profile, data)

    def serialize(self) -> bytes:
        first = 0x80 | (0x10 if self.extension else 0) | len(self.csrcs)
        out = RTP_HEADER.pack(
            first,
            (0x80 if self.marker else 0) | self.payload_type,
            self.sequence & 0xFFFF,
            self.timestamp & 0xFFFFFFFF,
            self.ssrc,
        )
        out += b"".join(struct.pack("!I", c) for c in self.csrcs)
        if self.extension:
            profile, data = self.extension
            if len(data) % 4:
                raise RtpError("extension data must be a whole number of words")
            out += struct.pack("!HH", profile, len(data) // 4) + data
        return out + self.payload


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse an RTP packet (padding removed); raises only `RtpError`."""
    if len(data) < RTP_HEADER.size:
        raise RtpError("short RTP packet")
    first, second, seq, ts, ssrc = RTP_HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise RtpError("not RTP version 2")
    offset = RTP_HEADER.size
    cc = first & 0x0F
    if len(data) < offset + 4 * cc:
        raise RtpError("truncated CSRC list")
    csrcs = list(struct.unpack_from(f"!{cc}I", data, offset))
    offset += 4 * cc
    extension = None
    if first & 0x10:
        if len(data) < offset + 4:
            raise RtpError("truncated header extension")
        profile, words = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + 4 * words
        if len(data) < end:
            raise RtpError("truncated header extension")
        extension = (profile, bytes(data[offset + 4 : end]))
        offset = end
    end = len(data)
    if first & 0x20:
        pad = data[-1]
        if pad == 0 or offset + pad > end:
            raise RtpError("bad padding")
        end -= pad
    return RtpPacket(
        second & 0x7F, seq, ts, ssrc, bytes(data[offset:end]), bool(second & 0x80), csrcs, extension
    )


def rtp_ssrc(data: bytes) -> int:
    return struct.unpack_from("!I", data, 8)[0]


_SEQ_TS_SSRC = struct.Struct("!HII")  # sequence, timestamp, ssrc at offset 2
_EXTENSION_WORDS = struct.Struct("!H")  # at offset 2 of the header extension


def plain_header_size(data: bytes) -> int:
    """Header size (fixed part, CSRCs, extension) of a well-formed version-2 RTP packet
    without padding; -1 for anything else (malformed, or padded: `parse_rtp` handles those)."""
    size = len(data)
    if size < 12:
        return -1
    first = data[0]
    if first & 0xE0 != 0x80:  # version 2, no padding
        return -1
    header = 12 + 4 * (first & 0x0F)
    if first & 0x10:
        if size < header + 4:
            return -1
        header += 4 + 4 * _EXTENSION_WORDS.unpack_from(data, header + 2)[0]
    return header if header <= size else -1


def rtp_timestamp(data: bytes) -> int:
    """The timestamp of an RTP packet of at least 12 bytes."""
    return _SEQ_TS_SSRC.unpack_from(data, 2)[1]


def restamp_rtp(data: bytes, header_size: int, sequence: int, timestamp: int, ssrc: int) -> bytes:
    """A plain 12-byte header (`data`'s marker and payload type, the given numbering), then
    `data`'s payload after its `header_size` header bytes (see `plain_header_size`).

    The same bytes as `RtpPacket(...).serialize()` of the parsed packet with that numbering
    and without CSRCs or extension, built without parsing."""
    return RTP_HEADER.pack(0x80, data[1], sequence, timestamp, ssrc) + data[header_size:]


# RTCP -------------------------------------------------------------------------------------------


@dataclass
class ReportBlock:
    ssrc: int
    fraction_lost: int  # 0..255
    packets_lost: int  # signed 24-bit cumulative
    highest_sequence: int  # extended
    jitter: int
    lsr: int
    dlsr: int

    def serialize(self) -> bytes:
        lost = (self.fraction_lost << 24) | (self.packets_lost & 0xFFFFFF)
        return REPORT_BLOCK.pack(
            self.ssrc,
            lost,
            self.highest_sequence & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.lsr,
            self.dlsr,
        )

    @classmethod
    def parse(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, lost, highest, jitter, lsr, dlsr = REPORT_BLOCK.unpack_from(data, offset)
        cumulative = lost & 0xFFFFFF
        if cumulative & 0x800000:
            cumulative -= 1 << 24
        return cls(ssrc, lost >> 24, cumulative, highest, jitter, lsr, dlsr)


@dataclass
class RtcpPacket:
    packet_type: int
    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)
    ntp: int = 0  # SR only: 64-bit NTP timestamp
    rtp_timestamp: int = 0
    packet_count: int = 0
    octet_count: int = 0


def build_receiver_report(ssrc: int, reports: list[ReportBlock]) -> bytes:
    body = struct.pack("!I", ssrc) + b"".join(r.serialize() for r in reports)
    return RTCP_HEADER.pack(0x80 | len(reports), RTCP_RR, len(body) // 4) + body


def build_sender_report(
    ssrc: int,
    ntp: int,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: list[ReportBlock] | None = None,
) -> bytes:
    reports = reports or []
    body = struct.pack("!IQIII", ssrc, ntp, rtp_timestamp, packet_count, octet_count)
    body += b"".join(r.serialize() for r in reports)
    return RTCP_HEADER.pack(0x80 | len(reports), RTCP_SR, len(body) // 4) + body


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """SR and RR packets of a compound RTCP packet (other types skipped); raises `RtpError`."""
    packets = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise RtpError("truncated RTCP header")
        first, ptype, words = RTCP_HEADER.unpack_from(data, offset)
        if first >> 6 != 2:
            raise RtpError("not RTCP version 2")
        end = offset + 4 * (words + 1)
        if end > len(data):
            raise RtpError("truncated RTCP packet")
        count = first & 0x1F
        body = offset + 4
        if ptype in (RTCP_SR, RTCP_RR):
            fixed = 24 if ptype == RTCP_SR else 4
            if body + fixed + count * REPORT_BLOCK.size > end:
                raise RtpError("RTCP report blocks overrun the packet")
            (ssrc,) = struct.unpack_from("!I", data, body)
            packet = RtcpPacket(ptype, ssrc)
            if ptype == RTCP_SR:
                (packet.ntp, packet.rtp_timestamp, packet.packet_count, packet.octet_count) = (
                    struct.unpack_from("!QIII", data, body + 4)
                )
            packet.reports = [
                ReportBlock.parse(data, body + fixed + i * REPORT_BLOCK.size) for i in range(count)
            ]
            packets.append(packet)
        offset = end
    return packets


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp (LSR)."""
    return (ntp >> 16) & 0xFFFFFFFF


def ntp_from_seconds(seconds: float) -> int:
    whole = int(seconds)
    return ((whole & 0xFFFFFFFF) << 32) | int((seconds - whole) * (1 << 32))


class ReceiveStats:
    """RFC 3550 A.1/A.3/A.8: sequence tracking, loss and jitter of one incoming stream."""

    def __init__(self, clock_rate: int = 48000) -> None:
        self.clock_rate = clock_rate
        self.ssrc = 0
        self.base_seq: int | None = None
        self.max_seq = 0
        self.cycles = 0
        self.received = 0
        self.jitter = 0.0
        self._transit: float | None = None
        self._expected_prior = 0
        self._received_prior = 0
        self.last_sr = 0  # middle 32 bits of the last SR's NTP
        self.last_sr_at: float | None = None

    def add(self, ssrc: int, sequence: int, timestamp: int, now: float) -> None:
        if self.base_seq is None:
            self.ssrc, self.base_seq, self.max_seq = ssrc, sequence, sequence
        else:
            delta = (sequence - self.max_seq) & 0xFFFF
            if 0 < delta < 0x8000:
                if sequence < self.max_seq:
                    self.cycles += 1 << 16
                self.max_seq = sequence
        self.received += 1
        transit = now * self.clock_rate - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            self.jitter += (d - self.jitter) / 16
        self._transit = transit

    def on_sender_report(self, ntp: int, now: float) -> None:
        self.last_sr = ntp_middle(ntp)
        self.last_sr_at = now

    @property
    def expected(self) -> int:
        if self.base_seq is None:
            return 0
        return self.cycles + self.max_seq - self.base_seq + 1

    @property
    def lost(self) -> int:
        return max(-(1 << 23), min((1 << 23) - 1, self.expected - self.received))

    def report_block(self, now: float) -> ReportBlock:
        """A report block for an RR, resetting the per-interval fraction lost."""
        expected_interval = self.expected - self._expected_prior
        received_interval = self.received - self._received_prior
        self._expected_prior, self._received_prior = self.expected, self.received
        lost_interval = expected_interval - received_interval
        fraction = (
            0
            if expected_interval <= 0 or lost_interval <= 0
            else ((lost_interval << 8) // expected_interval)
        )
        dlsr = 0 if self.last_sr_at is None else int((now - self.last_sr_at) * 65536)
        return ReportBlock(
            self.ssrc,
            min(fraction, 255),
            self.lost,
            self.cycles + self.max_seq,
            int(self.jitter),
            self.last_sr,
            dlsr,
        )
