"""The transceiver's DTLS identity: one self-signed ECDSA P-256 certificate per process."""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def fingerprint_of(cert: x509.Certificate) -> str:
    """SDP form of a certificate's SHA-256 fingerprint: `sha-256 AB:CD:...`."""
    digest = cert.fingerprint(hashes.SHA256())
    return "sha-256 " + ":".join(f"{b:02X}" for b in digest)


def normalize_fingerprint(text: str) -> str:
    """`SHA-256 ab:cd` -> `sha-256 AB:CD` so fingerprints compare as strings."""
    algorithm, _, value = text.strip().partition(" ")
    return f"{algorithm.lower()} {value.strip().upper()}"


class Certificate:
    """A key pair and self-signed certificate, ready for pyOpenSSL."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.fingerprint = fingerprint_of(cert)

    @classmethod
    def generate(cls, days: int = 30) -> Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, os.urandom(8).hex())])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)
