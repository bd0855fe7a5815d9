"""DtlsEndpoint on a context shared per certificate: each call still checks its own peer, and
no call can resume another's DTLS session; its state table; retransmission on OpenSSL's clock
(the one test here that waits in real time)."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.dtls import (
    BEGIN,
    CLOSE,
    CLOSED,
    CONNECTED,
    DEFAULT_PROFILES,
    FAIL,
    FAILED,
    HANDSHAKE_DONE,
    HANDSHAKING,
    NEW,
    DtlsEndpoint,
    next_state,
    shared_context,
)

HANDSHAKE, CERTIFICATE, NEW_SESSION_TICKET = 22, 11, 4


def handshake_types(datagrams: list[bytes]) -> list[int]:
    """Message types of the plaintext (epoch 0) handshake records in some datagrams."""
    types = []
    for data in datagrams:
        offset = 0
        while offset + 13 <= len(data):
            length = int.from_bytes(data[offset + 11 : offset + 13], "big")
            if data[offset] == HANDSHAKE and data[offset + 3 : offset + 5] == b"\0\0":
                types.append(data[offset + 13])
            offset += 13 + length
    return types


def connect(client: DtlsEndpoint, server: DtlsEndpoint) -> list[int]:
    """Run a handshake in memory; the handshake message types the server sent."""
    sent: list[int] = []
    client.start(0.0)
    for _ in range(10):
        for data in client.datagrams_to_send():
            server.receive(data, 0.0)
        out = server.datagrams_to_send()
        sent += handshake_types(out)
        for data in out:
            client.receive(data, 0.0)
        if client.state != HANDSHAKING and server.state != HANDSHAKING:
            break
    return sent


def test_endpoints_of_one_certificate_share_one_context():
    ours, theirs = Certificate.generate(), Certificate.generate()
    a = DtlsEndpoint("server", ours, theirs.fingerprint)
    b = DtlsEndpoint("server", ours, theirs.fingerprint)
    other = DtlsEndpoint("server", Certificate.generate(), theirs.fingerprint)
    assert a.conn.get_context() is b.conn.get_context() is shared_context(ours, DEFAULT_PROFILES)
    assert other.conn.get_context() is not a.conn.get_context()
    assert shared_context(ours, b"SRTP_AES128_CM_SHA1_80") is not a.conn.get_context()
    # A shared server-side session cache would only grow (and offer resumption): off.
    assert a.conn.get_context().get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_each_endpoint_checks_its_own_peer_on_the_shared_context():
    server_cert, honest, impostor = (Certificate.generate() for _ in range(3))
    expecting_honest = DtlsEndpoint("server", server_cert, honest.fingerprint)
    expecting_other = DtlsEndpoint("server", server_cert, Certificate.generate().fingerprint)
    connect(DtlsEndpoint("client", impostor, server_cert.fingerprint), expecting_other)
    connect(DtlsEndpoint("client", honest, server_cert.fingerprint), expecting_honest)
    assert expecting_other.state == FAILED and expecting_other.error == "fingerprint-mismatch"
    assert expecting_honest.state == CONNECTED and expecting_honest.srtp_keys is not None


def test_no_call_resumes_another_calls_session():
    server_cert, client_cert = Certificate.generate(), Certificate.generate()
    first = DtlsEndpoint("client", client_cert, server_cert.fingerprint)
    sent = connect(first, DtlsEndpoint("server", server_cert, client_cert.fingerprint))
    assert first.state == CONNECTED
    assert NEW_SESSION_TICKET not in sent  # no ticket to come back with
    second = DtlsEndpoint("client", client_cert, server_cert.fingerprint)
    second.conn.set_session(first.conn.get_session())  # try to resume the first call
    server = DtlsEndpoint("server", server_cert, client_cert.fingerprint)
    sent = connect(second, server)
    assert server.state == CONNECTED
    assert CERTIFICATE in sent  # a full handshake: not resumed


def test_a_lost_flight_is_resent_when_openssls_clock_says_it_is_due():
    server_cert, client_cert = Certificate.generate(), Certificate.generate()
    client = DtlsEndpoint("client", client_cert, server_cert.fingerprint)
    server = DtlsEndpoint("server", server_cert, client_cert.fingerprint)
    client.start(0.0)
    assert client.datagrams_to_send()  # the ClientHello, lost
    due = client.next_timer()
    assert due is not None and 0.9 < due <= 1.0  # RFC 6347: 1 s at first, on the injected clock
    client.handle_timer(due + 10)  # due on the injected clock only: OpenSSL's has not run out
    assert client.datagrams_to_send() == []
    deadline = time.monotonic() + 5
    while (left := client.conn.DTLSv1_get_timeout()) and time.monotonic() < deadline:
        time.sleep(left)  # what OpenSSL says it still waits
    client.handle_timer(client.next_timer())
    resent = client.datagrams_to_send()
    assert resent
    for data in resent:
        server.receive(data, 20.0)
    assert server.datagrams_to_send()  # the server answers the resent ClientHello
    assert server.state == HANDSHAKING


ORDER = {NEW: 0, HANDSHAKING: 1, CONNECTED: 2, FAILED: 2, CLOSED: 3}


@given(st.lists(st.sampled_from([BEGIN, HANDSHAKE_DONE, FAIL, CLOSE]), max_size=10))
def test_dtls_states_only_move_forward_and_keys_need_a_handshake(triggers):
    state = NEW
    for trigger in triggers:
        after = next_state(state, trigger)
        assert ORDER[after] >= ORDER[state]
        assert after not in (CONNECTED, FAILED) or state in (HANDSHAKING, after)
        state = after
    assert (state == CLOSED) == (CLOSE in triggers)
