"""Routing tokens: sealed, unforgeable, inside ICE's alphabet, rotatable."""

from __future__ import annotations

import base64
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.wire.token import TokenError, TokenKeys, load_keys, write_new_secret

KEYS = TokenKeys({1: b"k" * 32}, 1)
addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)
)
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{4,256}")


@given(st.integers(0, 65535), addresses)
def test_seal_then_open_round_trips_within_ice_rules(cluster, addr):
    token = KEYS.seal(cluster, addr)
    assert ICE_CHARS.fullmatch(token)
    route = KEYS.open(token)
    assert route.cluster_id == cluster
    assert route.transceiver == addr
    assert len(route.nonce) == 12


def test_every_token_is_unique():
    assert len({KEYS.seal(0, ("127.0.0.1", 5000)) for _ in range(200)}) == 200


@settings(max_examples=30)
@given(addresses)
def test_flipping_any_bit_of_a_token_makes_it_fail(addr):
    """Every bit of the token as it travels (the ufrag text), and every bit of what it encodes."""
    token = KEYS.seal(7, addr).encode()
    assert KEYS.open(token).transceiver == addr
    for bit in range(len(token) * 8):  # the text: includes the unused low bits of the last char
        mutated = bytearray(token)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(TokenError):
            KEYS.open(bytes(mutated))
    raw = base64.b64decode(token + b"=" * (-len(token) % 4))
    for bit in range(len(raw) * 8):  # the sealed bytes: key id, nonce, ciphertext, tag
        mutated = bytearray(raw)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(TokenError):
            KEYS.open(base64.b64encode(bytes(mutated)).rstrip(b"="))


@given(st.binary(max_size=300))
def test_open_raises_only_token_error(data):
    with pytest.raises(TokenError):
        KEYS.open(data)


def test_errors_say_why():
    with pytest.raises(TokenError) as exc:
        KEYS.open("ab")
    assert exc.value.reason == "length"
    with pytest.raises(TokenError) as exc:
        KEYS.open("abc-def_ghi")
    assert exc.value.reason == "alphabet"
    other = TokenKeys({9: b"z" * 32}, 9).seal(0, ("127.0.0.1", 1))
    with pytest.raises(TokenError) as exc:
        KEYS.open(other)
    assert exc.value.reason == "key-id"
    forged = TokenKeys({1: b"x" * 32}, 1).seal(0, ("10.0.0.1", 1))  # right key id, wrong key
    with pytest.raises(TokenError) as exc:
        KEYS.open(forged)
    assert exc.value.reason == "seal"


def test_rotation_keeps_old_tokens_opening():
    old = TokenKeys({1: b"a" * 32}, 1)
    token = old.seal(3, ("127.0.0.1", 5000))
    rotated = TokenKeys({2: b"b" * 32, 1: b"a" * 32}, 2)
    assert rotated.open(token).transceiver == ("127.0.0.1", 5000)
    assert rotated.open(rotated.seal(3, ("::1", 1))).transceiver == ("::1", 1)
    retired = TokenKeys({2: b"b" * 32}, 2)
    with pytest.raises(TokenError):
        retired.open(token)


def test_secret_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "s" / "secret.key"
    keys = write_new_secret(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_keys(path).open(keys.seal(0, ("127.0.0.1", 9))).transceiver == ("127.0.0.1", 9)
    with pytest.raises(FileExistsError):
        write_new_secret(path)
    with pytest.raises(TokenError, match="does not exist"):
        load_keys(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("0 nothex\n")
    with pytest.raises(TokenError, match="bad:1"):
        load_keys(bad)
    two = tmp_path / "two"
    two.write_text(f"# rotated\n5 {os.urandom(32).hex()}\n4 {os.urandom(32).hex()}\n")
    assert load_keys(two).current == 5 and load_keys(two).key_ids == [4, 5]
