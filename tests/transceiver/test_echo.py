"""The echo's in-place rewrite: the same bytes and counts as parsing and re-serializing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.transceiver.test_sdp_rtp import rtp_packets
from voicerelay.transceiver.apps import EchoApp, RtpSender
from voicerelay.transceiver.rtp import (
    RtpError,
    RtpPacket,
    parse_rtp,
    plain_header_size,
    restamp_rtp,
)


def padded(packet: RtpPacket, pad: int) -> bytes:
    """`packet` with `pad` bytes of RTP padding (P bit set, last byte the count)."""
    data = bytearray(packet.serialize())
    data[0] |= 0x20
    return bytes(data) + bytes(pad - 1) + bytes([pad])


def mangled(data: bytes, first: int, cut: int) -> bytes:
    """A packet with another first byte and maybe cut short: malformed more often than not."""
    return bytes([first]) + data[1 : max(1, len(data) - cut)]


packets = st.one_of(
    rtp_packets.map(RtpPacket.serialize),
    st.builds(padded, rtp_packets, st.integers(1, 255)),
    st.builds(
        mangled, rtp_packets.map(RtpPacket.serialize), st.integers(0, 255), st.integers(0, 20)
    ),
    st.binary(max_size=64),
)


def reference_echo(sender: RtpSender, packet: bytes) -> list[bytes]:
    """What the echo did before the in-place rewrite: parse, then stamp the parsed packet."""
    try:
        rtp = parse_rtp(packet)
    except RtpError:
        return []
    return [sender.stamp(rtp.payload_type, rtp.timestamp, rtp.payload, rtp.marker)]


def twin_apps() -> tuple[EchoApp, RtpSender]:
    app, reference = EchoApp(4242), RtpSender(4242)
    reference.sequence = app.sender.sequence
    reference.timestamp_offset = app.sender.timestamp_offset
    return app, reference


def sender_state(sender: RtpSender) -> tuple[int, ...]:
    return (sender.sequence, sender.last_timestamp, sender.packets, sender.octets)


@given(st.lists(packets, max_size=8))
def test_echo_gives_the_bytes_and_counts_of_parse_and_stamp(stream):
    app, reference = twin_apps()
    for packet in stream:
        assert app.on_rtp(packet, 0.0) == reference_echo(reference, packet)
        assert sender_state(app.sender) == sender_state(reference)


@given(rtp_packets)
def test_plain_header_size_finds_the_payload_of_unpadded_packets(packet):
    data = packet.serialize()
    size = plain_header_size(data)
    assert size == 12 + 4 * len(packet.csrcs) + (
        4 + len(packet.extension[1]) if packet.extension else 0
    )
    assert data[size:] == packet.payload


@given(rtp_packets, st.integers(1, 255))
def test_plain_header_size_leaves_padded_packets_to_the_parser(packet, pad):
    assert plain_header_size(padded(packet, pad)) == -1


@given(st.binary(max_size=64))
def test_plain_header_size_accepts_only_what_parses(data):
    if plain_header_size(data) >= 0:
        parse_rtp(data)  # does not raise


@given(rtp_packets, st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_restamp_keeps_marker_payload_type_and_payload(packet, seq, ts, ssrc):
    data = packet.serialize()
    out = parse_rtp(restamp_rtp(data, plain_header_size(data), seq, ts, ssrc))
    assert (out.sequence, out.timestamp, out.ssrc) == (seq, ts, ssrc)
    assert (out.payload_type, out.marker, out.payload) == (
        packet.payload_type,
        packet.marker,
        packet.payload,
    )
    assert out.csrcs == [] and out.extension is None  # the echo is our stream, not theirs


def test_echo_numbers_packets_as_its_own_stream():
    app = EchoApp(4242)
    first_seq, offset = app.sender.sequence, app.sender.timestamp_offset
    out = [
        parse_rtp(app.on_rtp(RtpPacket(111, 7 + i, 960 * i, 1111, b"x%d" % i).serialize(), 0.0)[0])
        for i in range(3)
    ]
    assert [p.sequence for p in out] == [(first_seq + i) & 0xFFFF for i in (1, 2, 3)]
    assert [p.timestamp for p in out] == [(960 * i + offset) & 0xFFFFFFFF for i in range(3)]
    assert {p.ssrc for p in out} == {4242}
    assert [p.payload for p in out] == [b"x0", b"x1", b"x2"]
