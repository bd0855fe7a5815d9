"""HTTPS for signaling and the page: a self-signed certificate made on first use and kept in
the state directory (`https.crt`, `https.key` 0600), or the operator's own pair.

Browsers grant the microphone only to secure contexts: a page opened from another host over
plain HTTP cannot call. The self-signed certificate names localhost, the loopback addresses
and the addresses signaling is reached at; a browser asks once to accept it (its SHA-256
fingerprint is printed to compare), a command-line client trusts it with `--cafile`.

`make_self_signed` and `covers` are pure (the time is given); `ensure_self_signed` and
`server_context` touch files.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from voicerelay.config import ConfigError

CERT_NAME = "https.crt"  # in the state directory
KEY_NAME = "https.key"  # in the state directory, 0600
VALID_DAYS = 825  # the longest lifetime Apple platforms accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)  # a certificate this close to its end is replaced
BASE_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class SelfSigned:
    """The certificate and key files, and whether this run made them."""

    cert: Path
    key: Path
    created: bool
    fingerprint: str  # "AB:CD:..." (SHA-256), what a browser shows for the certificate


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_self_signed(
    names: Iterable[str], now: datetime.datetime, days: int = VALID_DAYS
) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 server certificate for `names` (IP literals and host names)
    valid from a day before `now` for `days` days: (certificate PEM, private key PEM)."""
    names = list(dict.fromkeys(names))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voicerelay (self-signed)")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert_pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint as browsers show it: `AB:CD:...`."""
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def covers(cert_pem: bytes, key_pem: bytes, names: Iterable[str], now: datetime.datetime) -> bool:
    """Can this pair be kept: both parse, the key is the certificate's, it names every one of
    `names` and stays valid for more than `RENEW_BEFORE` after `now`."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        alternatives = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return False
    own = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if cert.public_key().public_bytes(pem, own) != key.public_key().public_bytes(pem, own):
        return False
    named = {str(n) for n in alternatives.get_values_for_type(x509.IPAddress)}
    named |= set(alternatives.get_values_for_type(x509.DNSName))
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc - RENEW_BEFORE
    return valid and wanted <= named


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_names(hosts: Iterable[str]) -> list[str]:
    """What a self-signed certificate names: localhost, both loopback addresses and `hosts`
    (where signaling is reached; wildcards skipped)."""
    extra = [h for h in hosts if not (_is_ip(h) and ipaddress.ip_address(h).is_unspecified)]
    return list(dict.fromkeys([*BASE_NAMES, *(str(ipaddress.ip_address(h)) for h in extra)]))


def ensure_self_signed(
    state_dir: Path, hosts: Iterable[str], now: datetime.datetime | None = None
) -> SelfSigned:
    """The state directory's certificate, made on first use (and again when it no longer
    names every host or nears its end); the key is written 0600. ConfigError (one line) if
    the directory cannot hold them."""
    now = now or datetime.datetime.now(datetime.UTC)
    names = certificate_names(hosts)
    cert_path, key_path = state_dir / CERT_NAME, state_dir / KEY_NAME
    with contextlib.suppress(OSError):
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        if covers(cert_pem, key_pem, names, now):
            return SelfSigned(cert_path, key_path, False, fingerprint(cert_pem))
    cert_pem, key_pem = make_self_signed(names, now)
    try:
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert_pem, mode=0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the HTTPS certificate in {state_dir} ({exc.strerror}): "
            "choose a writable --state-dir, or give --cert and --key"
        ) from None
    return SelfSigned(cert_path, key_path, True, fingerprint(cert_pem))


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically, created with `mode` (never readable by others
    while being written)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for the pair; a one-line ConfigError naming --cert / --key if
    the files cannot be read or do not belong together."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for path, option in ((cert, "--cert"), (key, "--key")):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist: give a PEM file")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise ConfigError(
            f"--cert {cert} / --key {key} cannot be used ({reason}): give a PEM certificate "
            "and its unencrypted private key"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"--cert {cert} / --key {key} cannot be read ({exc.strerror}): check the files"
        ) from None
    return context
