"""The voice-app seam: what a session does with the audio it receives.

A `VoiceApp` gets each decrypted RTP packet and returns the RTP packets to send back; the
session encrypts and sends them. `EchoApp` needs no codec: it returns the client's Opus payload
under the server's own SSRC and sequence numbers.

Decoded-audio apps sit behind the same seam: `voicerelay.voice.pipeline.CallAudio` decodes,
endpoints and paces, and sends its frames from `handle_timer`, driven by the session's timer
(docs/VOICE.md). The session asks for the app's timer only once the call is secure, and an app
whose `on_rtp` can move that timer says so with `moves_timer` (the server then re-arms after
media; the echo's does not, so echo media only transmits).
"""

from __future__ import annotations

import os
from typing import Protocol

from voicerelay.transceiver.rtp import (
    RtpError,
    RtpPacket,
    parse_rtp,
    plain_header_size,
    restamp_rtp,
    rtp_timestamp,
)


class VoiceApp(Protocol):
    """What a session hands its incoming audio to."""

    moves_timer: bool  # True if `on_rtp` can move `next_timer` (the server then reschedules)

    def on_rtp(self, packet: bytes, now: float) -> list[bytes]:
        """Plain RTP in; plain RTP packets to send back out now."""
        ...

    def next_timer(self) -> float | None:
        """When the app next wants `handle_timer` (None: no timer)."""
        ...

    def handle_timer(self, now: float) -> list[bytes]:
        """Plain RTP packets due by `now`."""
        ...


class RtpSender:
    """Stamps outgoing packets with our SSRC and our own sequence/timestamp numbering."""

    def __init__(self, ssrc: int) -> None:
        self.ssrc = ssrc
        self.sequence = int.from_bytes(os.urandom(2), "big")
        self.timestamp_offset = int.from_bytes(os.urandom(4), "big")
        self.packets = 0
        self.octets = 0
        self.last_timestamp = 0

    def stamp(
        self, payload_type: int, timestamp: int, payload: bytes, marker: bool = False
    ) -> bytes:
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.last_timestamp = (timestamp + self.timestamp_offset) & 0xFFFFFFFF
        self.packets += 1
        self.octets += len(payload)
        return RtpPacket(
            payload_type, self.sequence, self.last_timestamp, self.ssrc, payload, marker
        ).serialize()

    def restamp(self, packet: bytes, header_size: int) -> bytes:
        """`stamp` for a packet whose `plain_header_size` is `header_size`, without parsing
        it: the same bytes and counts (marker, payload type and payload kept; CSRCs and
        header extension dropped, as `stamp` does)."""
        self.sequence = sequence = (self.sequence + 1) & 0xFFFF
        self.last_timestamp = timestamp = (
            rtp_timestamp(packet) + self.timestamp_offset
        ) & 0xFFFFFFFF
        self.packets += 1
        self.octets += len(packet) - header_size
        return restamp_rtp(packet, header_size, sequence, timestamp, self.ssrc)


class EchoApp:
    """Sends every received Opus packet straight back: no decode, the server's own SSRC."""

    moves_timer = False

    def __init__(self, ssrc: int) -> None:
        self.sender = RtpSender(ssrc)

    def next_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[bytes]:
        return []

    def on_rtp(self, packet: bytes, now: float) -> list[bytes]:
        header_size = plain_header_size(packet)
        if header_size >= 0:  # the usual packet: a new fixed header, the payload as it is
            return [self.sender.restamp(packet, header_size)]
        try:  # padded (stripped on the way back, as `serialize` does) or malformed
            rtp = parse_rtp(packet)
        except RtpError:
            return []
        return [self.sender.stamp(rtp.payload_type, rtp.timestamp, rtp.payload, rtp.marker)]
