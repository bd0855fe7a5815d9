"""STUN codec: round trips, integrity, fingerprint, the relay fast path, and aioice interop."""

from __future__ import annotations

import os
import struct

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.wire import stun

tids = st.binary(min_size=12, max_size=12)
attr_values = st.binary(max_size=64)
attributes = st.lists(
    st.tuples(
        st.integers(0x0001, 0x7FFF).filter(
            lambda t: t not in (stun.ATTR_MESSAGE_INTEGRITY, stun.ATTR_FINGERPRINT)
        ),
        attr_values,
    ),
    max_size=6,
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


PARSE_REASONS = {"short", "not-stun", "length", "attribute"}


def _stun_shaped(msg_type: int, body: bytes, length_delta: int, tid: bytes) -> bytes:
    """A STUN header with the magic cookie (so parsing gets past it) over an arbitrary body."""
    length = max(0, min(0xFFFF, len(body) + length_delta))
    return struct.pack("!HHI12s", msg_type, length, stun.MAGIC_COOKIE, tid) + body


def _damaged(message: bytes, cut: int, flips: list[int]) -> bytes:
    """A real message, truncated and/or with bits flipped."""
    data = bytearray(message[: max(0, len(message) - cut)])
    for bit in flips:
        if data:
            data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    return bytes(data)


# Random bytes almost never carry the magic cookie, so they only reach the first check of the
# parser. These reach every branch: STUN headers over random attribute bytes (lengths right and
# wrong), and real messages truncated or bit-flipped.
any_datagram = st.one_of(
    st.binary(max_size=200),
    st.builds(
        _stun_shaped,
        st.integers(0, 0xFFFF),
        st.binary(max_size=120),
        st.integers(-8, 8) | st.just(0),
        tids,
    ),
    st.builds(
        _damaged,
        st.builds(
            lambda t, tid, attrs, key: stun.build(t, tid, attrs, integrity_key=key),
            st.integers(0, 0x3FFF),
            tids,
            attributes,
            st.none() | st.binary(min_size=1, max_size=8),
        ),
        st.integers(0, 40),
        st.lists(st.integers(0, 8 * 200), max_size=3),
    ),
)


@settings(max_examples=500)
@given(any_datagram)
def test_any_bytes_parse_or_raise_stun_error(data):
    try:
        msg = stun.parse(data)
    except stun.StunError as exc:
        assert exc.reason in PARSE_REASONS
    else:
        assert len(msg.transaction_id) == 12
        assert all(0 <= kind <= 0xFFFF for kind, _ in msg.attributes)
    # The helpers over whole messages never raise either: they answer False.
    assert stun.verify_integrity(data, b"key") in (True, False)
    assert stun.verify_fingerprint(data) in (True, False)


def test_every_parse_error_reason_is_reachable():
    tid = b"t" * 12
    good = stun.build(stun.BINDING_REQUEST, tid, [(stun.ATTR_USERNAME, b"abc:d")])
    cases = {
        "short": good[:19],
        "not-stun": b"\xc0" + good[1:],
        "length": good[:-4],
        "attribute": _stun_shaped(1, b"\x00\x06\x00\x09abcd", 0, tid),  # value overruns
    }
    for reason, data in cases.items():
        with pytest.raises(stun.StunError) as exc:
            stun.parse(data)
        assert exc.value.reason == reason


@given(st.integers(0, 0x3FFF), tids, attributes, st.binary(max_size=20) | st.none(), st.booleans())
def test_build_then_parse_round_trips(msg_type, tid, attrs, key, fingerprint):
    data = stun.build(msg_type, tid, attrs, integrity_key=key, fingerprint=fingerprint)
    msg = stun.parse(data)
    assert msg.msg_type == msg_type and msg.transaction_id == tid
    assert msg.attributes[: len(attrs)] == attrs
    if key is not None:
        assert stun.verify_integrity(data, key)
        assert not stun.verify_integrity(data, key + b"x")
    assert stun.verify_fingerprint(data) == fingerprint


@given(tids, attributes, st.binary(min_size=1, max_size=20), st.data())
def test_flipping_any_bit_breaks_integrity_or_parsing(tid, attrs, key, data):
    message = bytearray(
        stun.build(stun.BINDING_REQUEST, tid, attrs, integrity_key=key, fingerprint=False)
    )
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    message[bit // 8] ^= 1 << (bit % 8)
    assert not stun.verify_integrity(bytes(message), key)


@given(
    tids,
    st.text(alphabet="ABCDabcd0123+/", min_size=1, max_size=60),
    st.text(alphabet="xyz", min_size=0, max_size=8),
    attributes,
)
def test_fast_path_matches_a_full_parse(tid, server, client, attrs):
    data = stun.build(
        stun.BINDING_REQUEST, tid, [*attrs, (stun.ATTR_USERNAME, f"{server}:{client}".encode())]
    )
    raw = stun.parse(data).get(stun.ATTR_USERNAME)  # the first USERNAME, as bytes: the
    assert raw is not None  # fast path hands the relay bytes, never decoded text
    assert stun.binding_server_ufrag(data) == raw.split(b":", 1)[0]


@settings(max_examples=500)
@given(any_datagram)
def test_fast_path_never_raises_and_never_reads_past_the_message(data):
    ufrag = stun.binding_server_ufrag(data)
    assert ufrag is None or isinstance(ufrag, bytes)
    if ufrag is not None:  # only a Binding request that parses as far as its USERNAME
        assert data[:2] == b"\x00\x01" and len(ufrag) <= stun.MAX_USERNAME
        assert ufrag in data and b":" not in ufrag


def test_fast_path_ignores_responses_and_indications():
    tid = os.urandom(12)
    for msg_type in (stun.BINDING_SUCCESS, stun.BINDING_INDICATION, stun.BINDING_ERROR):
        assert (
            stun.binding_server_ufrag(stun.build(msg_type, tid, [(stun.ATTR_USERNAME, b"a:b")]))
            is None
        )


@given(st.one_of(ipv4, ipv6), ports, tids)
def test_xor_mapped_address_round_trips(host, port, tid):
    assert stun.decode_xor_address(stun.encode_xor_address((host, port), tid), tid) == (host, port)


@given(st.integers(300, 699), st.text(max_size=30))
def test_error_code_round_trips(code, reason):
    assert stun.decode_error_code(stun.encode_error_code(code, reason)) == (code, reason)


def test_malformed_attribute_values_raise_stun_error():
    with pytest.raises(stun.StunError):
        stun.decode_xor_address(b"\x00\x01", b"x" * 12)
    with pytest.raises(stun.StunError):
        stun.decode_u32(b"abc")


def test_aioice_accepts_what_we_build():
    tid = os.urandom(12)
    data = stun.build(
        stun.BINDING_REQUEST,
        tid,
        [
            (stun.ATTR_USERNAME, b"srv:cli"),
            (stun.ATTR_PRIORITY, stun.encode_u32(1234)),
            (stun.ATTR_ICE_CONTROLLING, stun.encode_u64(99)),
            (stun.ATTR_USE_CANDIDATE, b""),
            (stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(("2001:db8::1", 4000), tid)),
        ],
        integrity_key=b"password",
    )
    theirs = aioice_stun.parse_message(data)
    assert theirs.transaction_id == tid
    assert theirs.attributes["USERNAME"] == "srv:cli"
    assert theirs.attributes["PRIORITY"] == 1234
    assert theirs.attributes["ICE-CONTROLLING"] == 99
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::1", 4000)
    assert "USE-CANDIDATE" in theirs.attributes
    theirs.check_message_integrity(b"password")  # raises if wrong


def test_we_accept_what_aioice_builds():
    msg = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
    )
    msg.attributes["USERNAME"] = "token123:client"
    msg.attributes["PRIORITY"] = 77
    msg.attributes["XOR-MAPPED-ADDRESS"] = ("192.0.2.7", 5060)
    msg.add_message_integrity(b"pw")
    msg.add_fingerprint()
    data = bytes(msg)
    ours = stun.parse(data)
    assert ours.username == "token123:client"
    assert stun.decode_u32(ours.get(stun.ATTR_PRIORITY)) == 77
    assert stun.decode_xor_address(ours.get(stun.ATTR_XOR_MAPPED_ADDRESS), ours.transaction_id) == (
        "192.0.2.7",
        5060,
    )
    assert stun.verify_integrity(data, b"pw") and stun.verify_fingerprint(data)
    assert stun.binding_server_ufrag(data) == b"token123"
