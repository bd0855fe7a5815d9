"""Envelope header and RFC 7983 demultiplexing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.wire import envelope
from voicerelay.wire.addr import canonical
from voicerelay.wire.demux import IS_DTLS, IS_RTP, IS_STUN, PacketKind, classify, is_rtcp

addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)
)


@given(addresses, st.binary(max_size=1500))
def test_envelope_round_trips(addr, payload):
    data = envelope.pack(addr, payload)
    assert len(data) == envelope.HEADER_SIZE + len(payload)
    assert envelope.unpack(data) == (canonical(addr), payload)


@given(st.binary(max_size=40))
def test_unpack_raises_only_envelope_error(data):
    try:
        envelope.unpack(data)
    except envelope.EnvelopeError as exc:
        assert exc.reason in {"short", "magic", "version", "family"}


def test_each_error_reason():
    good = envelope.pack(("192.0.2.1", 5), b"x")
    cases = {
        "short": good[:10],
        "magic": b"XX" + good[2:],
        "version": good[:2] + b"\x09" + good[3:],
        "family": good[:3] + b"\x05" + good[4:],
    }
    for reason, data in cases.items():
        with pytest.raises(envelope.EnvelopeError) as exc:
            envelope.unpack(data)
        assert exc.value.reason == reason


@given(st.binary(max_size=8))
def test_classify_follows_rfc7983(data):
    kind = classify(data)
    if not data:
        assert kind is PacketKind.UNKNOWN
    elif data[0] <= 3:
        assert kind is PacketKind.STUN
    elif 20 <= data[0] <= 63:
        assert kind is PacketKind.DTLS
    elif 128 <= data[0] <= 191:
        assert kind is PacketKind.RTP
    else:
        assert kind is PacketKind.UNKNOWN


@given(st.binary(min_size=1, max_size=4))
def test_the_hot_path_tables_agree_with_classify(data):
    kind = classify(data)
    first = data[0]
    assert IS_STUN[first] == (kind is PacketKind.STUN)
    assert IS_DTLS[first] == (kind is PacketKind.DTLS)
    assert IS_RTP[first] == (kind is PacketKind.RTP)


@given(st.binary(max_size=4))
def test_rtcp_is_rtp_with_an_rtcp_payload_type(data):
    assert is_rtcp(data) == (
        len(data) >= 2 and 128 <= data[0] <= 191 and 192 <= data[1] <= 223  # RFC 5761 by hand
    )


def test_rtcp_is_told_from_rtp_by_payload_type():
    assert is_rtcp(bytes([0x80, 200]))  # sender report
    assert is_rtcp(bytes([0x81, 201]))  # receiver report
    assert not is_rtcp(bytes([0x80, 111]))  # opus
    assert not is_rtcp(bytes([0x80, 0x80 | 111]))  # opus with marker
