"""The HTTPS certificate: made on first use, kept while it fits, a bad pair in one line."""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.config import ConfigError
from voicerelay.tls import (
    RENEW_BEFORE,
    VALID_DAYS,
    certificate_names,
    covers,
    ensure_self_signed,
    make_self_signed,
    server_context,
)

NOW = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.UTC)
NAMES = ["localhost", "127.0.0.1", "::1", "192.0.2.10"]


def alternative_names(cert_pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    return ips | set(names.get_values_for_type(x509.DNSName))


def test_a_made_certificate_names_every_host_and_fits_its_key():
    cert, key = make_self_signed(NAMES, NOW)
    assert alternative_names(cert) == set(NAMES)
    assert covers(cert, key, NAMES, NOW)
    assert covers(cert, key, ["0:0:0:0:0:0:0:1"], NOW)  # addresses compare as addresses


def test_a_certificate_is_not_kept_when_a_name_is_missing_or_its_end_is_near():
    cert, key = make_self_signed(NAMES, NOW)
    assert not covers(cert, key, [*NAMES, "198.51.100.1"], NOW)
    end = NOW + datetime.timedelta(days=VALID_DAYS)
    assert covers(cert, key, NAMES, end - RENEW_BEFORE - datetime.timedelta(seconds=1))
    assert not covers(cert, key, NAMES, end - RENEW_BEFORE)
    assert not covers(cert, key, NAMES, NOW - datetime.timedelta(days=2))  # not yet valid


def test_a_certificate_with_another_key_is_not_kept():
    cert, _ = make_self_signed(NAMES, NOW)
    _, other = make_self_signed(NAMES, NOW)
    assert not covers(cert, other, NAMES, NOW)


@settings(max_examples=50)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_bytes_are_simply_not_kept(cert, key):
    assert covers(cert, key, NAMES, NOW) is False


def test_names_always_include_localhost_and_loopback_and_skip_wildcards():
    assert certificate_names(["0.0.0.0", "::", "192.0.2.10", "127.0.0.1"]) == [
        "localhost",
        "127.0.0.1",
        "::1",
        "192.0.2.10",
    ]


def test_made_once_in_the_state_directory_then_kept(tmp_path):
    first = ensure_self_signed(tmp_path, ["192.0.2.10"], NOW)
    assert first.created and first.cert == tmp_path / "https.crt"
    assert first.key.stat().st_mode & 0o777 == 0o600
    assert first.cert.stat().st_mode & 0o777 == 0o644
    pem = first.cert.read_bytes()
    again = ensure_self_signed(tmp_path, ["192.0.2.10"], NOW + datetime.timedelta(days=100))
    assert not again.created and again.fingerprint == first.fingerprint
    assert first.cert.read_bytes() == pem
    moved = ensure_self_signed(tmp_path, ["192.0.2.11"], NOW)  # signaling moved: a new one
    assert moved.created and moved.fingerprint != first.fingerprint
    assert moved.key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["https.crt", "https.key"]


def test_a_broken_pair_in_the_state_directory_is_replaced(tmp_path):
    (tmp_path / "https.crt").write_text("not a certificate")
    (tmp_path / "https.key").write_text("not a key")
    made = ensure_self_signed(tmp_path, [], NOW)
    assert made.created and covers(made.cert.read_bytes(), made.key.read_bytes(), [], NOW)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake over memory buffers (no sockets); raises ssl.SSLError if refused."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    far = server.wrap_bio(bios[0], bios[1], server_side=True)
    near = client.wrap_bio(bios[2], bios[3], server_hostname=name)
    done = {far: False, near: False}
    for _ in range(10):
        for side in (near, far):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        bios[0].write(bios[3].read())  # client -> server
        bios[2].write(bios[1].read())  # server -> client
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", "192.0.2.10"])
def test_a_client_trusting_the_certificate_completes_a_handshake_for_every_name(tmp_path, name):
    made = ensure_self_signed(tmp_path, ["192.0.2.10"])
    server = server_context(made.cert, made.key)
    handshake(server, ssl.create_default_context(cafile=str(made.cert)), name)
    with pytest.raises(ssl.SSLCertVerificationError):  # a name it does not carry
        handshake(server, ssl.create_default_context(cafile=str(made.cert)), "192.0.2.11")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust it
        handshake(server, ssl.create_default_context(), name)


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("missing.crt", "good.key", "--cert {tmp}/missing.crt does not exist"),
        ("good.crt", "missing.key", "--key {tmp}/missing.key does not exist"),
        ("junk", "good.key", "cannot be used"),
        ("good.crt", "other.key", "cannot be used"),
    ],
)
def test_an_unusable_pair_is_one_line(tmp_path, cert, key, says):
    good_cert, good_key = make_self_signed([], NOW)
    (tmp_path / "good.crt").write_bytes(good_cert)
    (tmp_path / "good.key").write_bytes(good_key)
    (tmp_path / "other.key").write_bytes(make_self_signed([], NOW)[1])
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(ConfigError) as refused:
        server_context(tmp_path / cert, tmp_path / key)
    message = str(refused.value)
    assert says.replace("{tmp}", str(tmp_path)) in message and "\n" not in message


def test_a_transceiver_with_https_serves_the_state_directorys_certificate(tmp_path):
    from voicerelay.cli.transceiver_cmds import transceiver_config

    config = transceiver_config(
        "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:3478", tmp_path, None, 0, 30.0, 10, https=True
    )
    assert (config.tls_cert, config.tls_key) == (tmp_path / "https.crt", tmp_path / "https.key")
    assert config.https and (tmp_path / "https.key").stat().st_mode & 0o777 == 0o600
    plain = transceiver_config(
        "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:3478", tmp_path, None, 0, 30.0, 10
    )
    assert not plain.https and plain.tls_cert is None
