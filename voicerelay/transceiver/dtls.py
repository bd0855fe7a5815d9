"""DTLS 1.2 with use_srtp over pyOpenSSL memory BIOs, as a sans-IO endpoint.

Feed datagrams with `receive`, collect datagrams with `datagrams_to_send` (whole records
packed up to the MTU), drive retransmission with `next_timer`/`handle_timer`. Once the
handshake is done and the peer's certificate matches the SDP fingerprint, `srtp_keys` holds
the RFC 5764 keying material for the negotiated profile.

The one clock the transceiver's sans-IO core does not own is here: OpenSSL times DTLS
retransmission (1 s, doubling to 60 s) on its own clock, and nothing pyOpenSSL exposes moves it.
`DTLSv1_handle_timeout` does nothing until OpenSSL's clock says the flight is due, OpenSSL also
retransmits by itself inside any handshake step once it is due, `DTLS_set_timer_cb` is neither
bound nor exported from the OpenSSL that cryptography links in, and sending the last flight
again ourselves would repeat its record numbers, which the peer drops as replays (so a lost
final flight would never be answered). So `next_timer` maps OpenSSL's remaining time onto the
injected clock (`now` of the last input + what OpenSSL has left), and `handle_timer` lets
OpenSSL retransmit when its clock agrees. On a clock that runs faster than real time (tests),
a lost flight is resent only once that much real time has passed.
"""

from __future__ import annotations

import contextlib
import struct
import weakref
from dataclasses import dataclass

from OpenSSL import SSL

from voicerelay.transceiver.certificate import Certificate, fingerprint_of, normalize_fingerprint

SRTP_PROFILES = {
    # OpenSSL name: (our name, key length, salt length)
    b"SRTP_AEAD_AES_128_GCM": ("AEAD_AES_128_GCM", 16, 12),
    b"SRTP_AES128_CM_SHA1_80": ("AES_CM_128_HMAC_SHA1_80", 16, 14),
}
DEFAULT_PROFILES = b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80"
RECORD_HEADER_SIZE = 13  # type, version, epoch, 48-bit sequence number, length

# Association states (`DtlsEndpoint.state`); `TRANSITIONS` is the only place that moves them.
NEW = "new"
HANDSHAKING = "handshaking"
CONNECTED = "connected"  # handshake done, peer checked, `srtp_keys` set
FAILED = "failed"  # `error` says why
CLOSED = "closed"
# What moves them:
BEGIN = "begin"  # the client's first flight, or the first datagram in
HANDSHAKE_DONE = "handshake-done"
FAIL = "fail"
CLOSE = "close"  # ours or the peer's close_notify
TRANSITIONS: dict[str, dict[str, str]] = {
    NEW: {BEGIN: HANDSHAKING, CLOSE: CLOSED},
    HANDSHAKING: {HANDSHAKE_DONE: CONNECTED, FAIL: FAILED, CLOSE: CLOSED},
    CONNECTED: {CLOSE: CLOSED},
    FAILED: {CLOSE: CLOSED},
    CLOSED: {},
}


def next_state(state: str, trigger: str) -> str:
    """The state after `trigger`; a trigger the state does not list leaves it as it is."""
    return TRANSITIONS[state].get(trigger, state)


@dataclass
class SrtpKeys:
    """Keying material from the handshake, already split by direction."""

    profile: str
    local: bytes  # key + salt we protect with
    remote: bytes  # key + salt we unprotect with


def split_records(data: bytes) -> list[bytes]:
    """Split concatenated DTLS records; a truncated tail is returned as its own chunk."""
    records = []
    offset = 0
    while offset < len(data):
        if offset + RECORD_HEADER_SIZE > len(data):
            records.append(data[offset:])
            break
        (length,) = struct.unpack_from("!H", data, offset + 11)
        end = offset + RECORD_HEADER_SIZE + length
        records.append(data[offset:end])
        offset = end
    return records


def pack_records(records: list[bytes], mtu: int) -> list[bytes]:
    """Group whole records into datagrams of at most `mtu` bytes (a bigger record goes alone)."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


_CONTEXTS: weakref.WeakKeyDictionary[Certificate, dict[bytes, SSL.Context]] = (
    weakref.WeakKeyDictionary()
)


def shared_context(certificate: Certificate, profiles: bytes) -> SSL.Context:
    """The one context for a certificate and SRTP profile list, made on first use.

    A context holds only what every association shares (our identity, ciphers, SRTP profiles,
    a verify callback that accepts any peer certificate); each `DtlsEndpoint` checks its own
    peer's fingerprint. Without a session cache or tickets no call can resume another's."""
    by_profiles = _CONTEXTS.setdefault(certificate, {})
    ctx = by_profiles.get(profiles)
    if ctx is None:
        ctx = by_profiles[profiles] = _make_context(certificate, profiles)
    return ctx


def _make_context(certificate: Certificate, profiles: bytes) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.use_certificate(certificate.cert)
    ctx.use_privatekey(certificate.key)
    # WebRTC peers use self-signed certificates: accept any here, check the SDP fingerprint after.
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: True)
    ctx.set_cipher_list(
        b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
    )
    ctx.set_tlsext_use_srtp(profiles)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # shared: no resumption across calls
    return ctx


class DtlsEndpoint:
    """One DTLS association. Role "client" sends the ClientHello when `start` is called."""

    def __init__(
        self,
        role: str,
        certificate: Certificate,
        remote_fingerprint: str,
        *,
        mtu: int = 1200,
        profiles: bytes = DEFAULT_PROFILES,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"DTLS role must be client or server, not {role!r}")
        self.role = role
        self.mtu = mtu
        self.remote_fingerprint = normalize_fingerprint(remote_fingerprint)
        self.conn = SSL.Connection(shared_context(certificate, profiles), None)
        self.conn.set_ciphertext_mtu(mtu)
        if role == "client":
            self.conn.set_connect_state()
        else:
            self.conn.set_accept_state()
        self.state = NEW
        self.srtp_keys: SrtpKeys | None = None
        self.error: str | None = None
        self.records_in_error = 0
        self._outbox: list[bytes] = []
        self._timer: float | None = None
        self._now = 0.0

    def _move(self, trigger: str) -> None:
        self.state = next_state(self.state, trigger)

    # Inputs -----------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin the handshake (the client's first flight; a no-op for a server)."""
        if self.state == NEW:
            self._move(BEGIN)
            self._now = now
            self._step()

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one datagram; returns application data (unused by WebRTC media)."""
        if self.state in (FAILED, CLOSED):
            return []
        self._move(BEGIN)
        self._now = now
        try:
            self.conn.bio_write(data)
        except SSL.Error:
            self.records_in_error += 1
            return []
        return self._step()

    def handle_timer(self, now: float) -> None:
        """Let OpenSSL retransmit its last flight if it is due (by OpenSSL's clock: see above)."""
        if self._timer is None or now < self._timer or self.state != HANDSHAKING:
            return
        self._now = now
        try:
            self.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(f"retransmission failed: {exc}")
        self._drain_bio()
        self._rearm()

    def close(self) -> None:
        """Send close_notify (if connected) and stop."""
        if self.state == CONNECTED:
            with contextlib.suppress(SSL.Error):
                self.conn.shutdown()
            self._drain_bio()
        self._move(CLOSE)
        self._timer = None

    # Outputs ----------------------------------------------------------------------------------
    def datagrams_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def next_timer(self) -> float | None:
        """When OpenSSL's retransmission is due, on the injected clock (None: nothing pending)."""
        return self._timer

    # Internals --------------------------------------------------------------------------------
    def _step(self) -> list[bytes]:
        received: list[bytes] = []
        if self.state == HANDSHAKING:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                self._fail(f"handshake failed: {exc}")
            else:
                self._connected()
        if self.state == CONNECTED:
            self._read_application_data(received)
        self._drain_bio()
        self._rearm()
        return received

    def _read_application_data(self, received: list[bytes]) -> None:
        while True:
            try:
                chunk = self.conn.recv(1500)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.error = "peer sent close_notify"
                self._move(CLOSE)
                return
            except SSL.Error:
                self.records_in_error += 1
                return
            if not chunk:
                return
            received.append(chunk)

    def _connected(self) -> None:
        cert = self.conn.get_peer_certificate()
        if cert is None:
            self._fail("peer sent no certificate")
            return
        if fingerprint_of(cert.to_cryptography()) != self.remote_fingerprint:
            with contextlib.suppress(SSL.Error):  # tell the impostor we are done with it
                self.conn.shutdown()
            self._fail("fingerprint-mismatch")
            return
        name = self.conn.get_selected_srtp_profile()
        if name not in SRTP_PROFILES:
            self._fail(f"no common SRTP profile ({name!r})")
            return
        self.srtp_keys = self._export_keys(name)
        self._move(HANDSHAKE_DONE)
        self._timer = None

    def _export_keys(self, name: bytes) -> SrtpKeys:
        """RFC 5764 s4.2 keying material, split into what we protect and unprotect with."""
        profile, key_len, salt_len = SRTP_PROFILES[name]
        material = self.conn.export_keying_material(
            b"EXTRACTOR-dtls_srtp", 2 * (key_len + salt_len)
        )
        client_key = material[:key_len]
        server_key = material[key_len : 2 * key_len]
        client_salt = material[2 * key_len : 2 * key_len + salt_len]
        server_salt = material[2 * key_len + salt_len :]
        client, server = client_key + client_salt, server_key + server_salt
        local, remote = (client, server) if self.role == "client" else (server, client)
        return SrtpKeys(profile, local, remote)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self._move(FAIL)
        self._timer = None
        self._drain_bio()  # an alert may be pending

    def _drain_bio(self) -> None:
        """Move what OpenSSL wrote to its outgoing memory BIO into datagrams to send."""
        pending = b""
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            except SSL.Error:
                break
            if not chunk:
                break
            pending += chunk
        if pending:
            self._outbox.extend(pack_records(split_records(pending), self.mtu))

    def _rearm(self) -> None:
        if self.state != HANDSHAKING:
            self._timer = None
            return
        timeout = self.conn.DTLSv1_get_timeout()  # OpenSSL's clock, read here only
        self._timer = None if timeout is None else self._now + timeout
