"""Routing tokens: sealed, unforgeable, inside ICE's alphabet, rotatable."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.wire.token import MAX_ISSUED, TokenError, TokenKeys, load_keys, write_new_secret

KEYS = TokenKeys({1: b"k" * 32}, 1)
addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)
)
issue_times = st.integers(0, MAX_ISSUED)
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]{4,256}")


def old_format_token(key: bytes, kid: int, cluster: int, addr: tuple[str, int]) -> str:
    """A format-1 token, as relays before issue times minted them (written out here, from the
    layout, independently of the module)."""
    ip = ipaddress.ip_address(addr[0])
    plain = struct.pack("!HBH", cluster, ip.version, addr[1]) + ip.packed
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plain, bytes([1, kid]))
    return base64.b64encode(bytes([kid]) + nonce + sealed).rstrip(b"=").decode()


@given(st.integers(0, 65535), addresses, issue_times)
def test_seal_then_open_round_trips_within_ice_rules(cluster, addr, issued):
    token = KEYS.seal(cluster, addr, issued)
    assert ICE_CHARS.fullmatch(token)
    assert len(token) == (56 if ":" not in addr[0] else 72)  # well inside ICE's 256
    route = KEYS.open(token)
    assert route.cluster_id == cluster
    assert route.transceiver == addr
    assert len(route.nonce) == 12
    assert route.issued_at == issued


@given(issue_times, st.integers(-(10**5), 10**5), st.integers(1, 10**4))
def test_a_token_is_fresh_only_within_its_window(issued, offset, window):
    route = KEYS.open(KEYS.seal(0, ("127.0.0.1", 1), issued))
    assert route.fresh(issued + offset, window) == (-window <= offset <= window + 1)


def test_the_issue_time_defaults_to_now_and_must_fit_in_u32():
    import time

    before = int(time.time())
    assert before <= KEYS.open(KEYS.seal(0, ("127.0.0.1", 1))).issued_at <= time.time()
    for bad in (-1, MAX_ISSUED + 1):
        with pytest.raises(ValueError):
            KEYS.seal(0, ("127.0.0.1", 1), bad)


@given(st.integers(0, 65535), addresses)
def test_old_format_tokens_are_recognised_and_refused(cluster, addr):
    token = old_format_token(b"k" * 32, 1, cluster, addr)
    with pytest.raises(TokenError) as exc:
        KEYS.open(token)
    assert exc.value.reason == "old-format"
    assert exc.value.route is not None and exc.value.route.transceiver == addr
    assert exc.value.route.issued_at is None and not exc.value.route.fresh(0, 1e12)
    forged = old_format_token(b"x" * 32, 1, cluster, addr)  # old layout, wrong key
    with pytest.raises(TokenError) as exc:
        KEYS.open(forged)
    assert exc.value.reason == "seal" and exc.value.route is None


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


@given(st.one_of(st.text(max_size=300), st.text(alphabet=ICE_CHARS.pattern[1:15], max_size=80)))
def test_arbitrary_text_raises_only_token_error(text):
    with pytest.raises(TokenError) as exc:
        KEYS.open(text)
    assert exc.value.reason in {"alphabet", "length", "key-id", "seal"}


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
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(TokenError) as exc:
        load_keys(binary)
    assert "not UTF-8" in str(exc.value) and "--secret-file" in str(exc.value)
    assert "\n" not in str(exc.value)
    two = tmp_path / "two"
    two.write_text(f"# rotated\n5 {os.urandom(32).hex()}\n4 {os.urandom(32).hex()}\n")
    assert load_keys(two).current == 5 and load_keys(two).key_ids == [4, 5]
