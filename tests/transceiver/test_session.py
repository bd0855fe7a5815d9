"""The sans-IO Session, both roles back to back: ICE-lite, DTLS, SRTP, echo, RTCP, closing."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transceiver.conftest import CLIENT, SERVER, Pair
from voicerelay.transceiver import dtls
from voicerelay.transceiver.rtp import RTCP_SR, RtpPacket, parse_rtcp, parse_rtp
from voicerelay.transceiver.session import (
    CHECKING,
    CHECKS_SENT,
    CLOSE,
    CLOSED,
    CONNECTED,
    COUNTER_NAMES,
    DTLS_UP,
    ICE_SELECTED,
    NEW,
    SECURE,
    TRANSITIONS,
    RtpReceived,
    SessionClosed,
    SessionConfig,
    next_state,
)
from voicerelay.wire import stun


def secure(pair: Pair) -> None:
    pair.run_until(lambda: pair.client.state == SECURE and pair.server.state == SECURE)


def talk(pair: Pair, packets: int = 20) -> list:
    for i in range(packets):
        pair.client.send_rtp(RtpPacket(111, i, i * 960, 1111, b"opus-%d" % i).serialize(), pair.now)
        pair.step(0.02)
    pair.step()
    return [parse_rtp(e.packet) for e in pair.client_events if isinstance(e, RtpReceived)]


@pytest.mark.parametrize(
    ("profiles", "name"),
    [
        (b"SRTP_AEAD_AES_128_GCM", "AEAD_AES_128_GCM"),
        (b"SRTP_AES128_CM_SHA1_80", "AES_CM_128_HMAC_SHA1_80"),
    ],
)
def test_echo_over_each_srtp_profile(profiles, name):
    pair = Pair(SessionConfig(srtp_profiles=profiles))
    secure(pair)
    assert pair.server.stats["srtp_profile"] == name
    echoed = talk(pair)
    assert [p.payload for p in echoed] == [b"opus-%d" % i for i in range(20)]
    assert {p.ssrc for p in echoed} == {4242}  # the server's own SSRC
    seqs = [p.sequence for p in echoed]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))


def test_server_can_take_the_dtls_client_role():
    pair = Pair(server_dtls="client")
    secure(pair)
    assert talk(pair, 3)


def test_nomination_follows_the_authenticated_use_candidate_check(pair):
    secure(pair)
    assert pair.server.ice.nominated == CLIENT


def test_wrong_integrity_and_username_get_no_answer(pair):
    secure(pair)
    for key, user in ((b"wrong" * 5, b"SRVR:CLNT"), (b"s" * 22, b"SRVR:OTHER")):
        pair.server.receive(
            stun.build(
                stun.BINDING_REQUEST,
                os.urandom(12),
                [(stun.ATTR_USERNAME, user)],
                integrity_key=key,
            ),
            ("203.0.113.9", 1),
            pair.now,
        )
        assert pair.server.datagrams_to_send() == []
    counters = pair.server.stats
    assert counters["ice_bad_integrity"] == 1 and counters["ice_bad_username"] == 1
    assert pair.server.ice.nominated == CLIENT  # not hijacked


def test_fingerprint_mismatch_closes_the_session():
    pair = Pair(lie_about_fingerprint=True)
    pair.run_until(lambda: pair.server.state == CLOSED)
    assert pair.server.close_reason == "fingerprint-mismatch"
    pair.run_until(lambda: pair.client.state == CLOSED)  # it heard close_notify


def test_consent_expiry_closes_a_silent_peer():
    pair = Pair(SessionConfig(consent_timeout=2.0, consent_interval=0.5))
    secure(pair)
    pair.run_until(lambda: not pair.now < 5, seconds=6)  # checks keep it alive
    assert pair.server.state == SECURE
    pair.drop = lambda data, to_server: to_server  # the client vanishes
    pair.run_until(lambda: pair.server.state == CLOSED, seconds=3)
    assert pair.server.close_reason == "consent-expired"
    assert any(
        isinstance(e, SessionClosed) and e.reason == "consent-expired" for e in pair.server_events
    )


def test_close_sends_close_notify(pair):
    secure(pair)
    pair.client.close(pair.now, "bye")
    pair.step()
    assert pair.server.state == CLOSED and pair.server.close_reason == "peer-closed"
    assert pair.client.close_reason == "bye"


def test_every_datagram_fits_the_mtu():
    pair = Pair(SessionConfig(mtu=1000))
    secure(pair)
    talk(pair, 3)
    assert max(pair.sizes) <= 1000


def test_a_lost_dtls_flight_keeps_both_sides_timed_on_the_injected_clock():
    # The resend itself is OpenSSL's, on its own clock: test_dtls.py waits for it in real time.
    pair = Pair()
    lost: list[bytes] = []

    def drop_first_server_flight(data, to_server):
        if not to_server and 20 <= data[0] <= 63 and not lost:
            lost.append(data)
            return True
        return False

    pair.drop = drop_first_server_flight
    pair.run_until(lambda: bool(lost))
    for session in (pair.client, pair.server):
        due = session.dtls.next_timer()
        assert due is not None and pair.now < due <= pair.now + 1.0  # RFC 6347: 1 s at first
        assert session.next_timer() == due  # the earliest thing the session waits for
    pair.run_until(lambda: not pair.now < 3, seconds=4)  # due on our clock, not on OpenSSL's
    assert pair.client.state == pair.server.state == CONNECTED  # waiting, nothing broken
    assert pair.client.dtls.state == pair.server.dtls.state == dtls.HANDSHAKING


def test_rtcp_reports_give_both_sides_an_rtt():
    pair = Pair(SessionConfig(rtcp_interval=0.2))
    secure(pair)
    talk(pair, 40)
    assert pair.server.stats["rtt"] is not None and pair.server.stats["rtt"] >= 0
    assert pair.server.stats["received"] == 40 and pair.server.stats["lost"] == 0
    assert pair.client.stats["rtcp_in"] > 0


mutations = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, x: bytes([b]) + x, st.integers(0, 255), st.binary(max_size=200)),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.lists(mutations, max_size=10), source=st.sampled_from([CLIENT, ("203.0.113.5", 9)])
)
def test_garbage_never_raises_and_the_call_keeps_working(garbage, source):
    pair = Pair()
    secure(pair)
    for data in garbage:
        pair.server.receive(data, source, pair.now)
        pair.client.receive(data, SERVER, pair.now)
    pair.server.datagrams_to_send()
    assert pair.server.state == SECURE
    assert talk(pair, 2)


def test_sender_reports_count_what_the_echo_sent():
    pair = Pair(SessionConfig(rtcp_interval=0.5))
    secure(pair)
    reports: list[bytes] = []
    srtp = pair.server.srtp
    protect = srtp.protect_rtcp
    srtp.protect_rtcp = lambda plain: reports.append(plain) or protect(plain)
    echoed = talk(pair, 12)
    seen = len(reports)
    pair.run_until(lambda: len(reports) > seen, seconds=1)  # one report after the last echo
    (sr,) = parse_rtcp(reports[-1])
    assert sr.packet_type == RTCP_SR and sr.ssrc == 4242
    assert sr.packet_count == 12 == pair.server.stats["rtp_out"]
    assert sr.octet_count == sum(len(b"opus-%d" % i) for i in range(12))
    assert sr.rtp_timestamp == echoed[-1].timestamp


def test_counters_read_as_a_dict(pair):
    secure(pair)
    talk(pair, 3)
    counters = pair.server.counters
    assert set(counters) == set(COUNTER_NAMES) and counters["rtp_in"] == counters["rtp_out"] == 3
    assert counters["packets_in"] == pair.server.packets_in
    assert {k: pair.server.stats[k] for k in COUNTER_NAMES} == counters


ORDER = [NEW, CHECKING, CONNECTED, SECURE, CLOSED]


@given(st.lists(st.sampled_from([CHECKS_SENT, ICE_SELECTED, DTLS_UP, CLOSE]), max_size=12))
def test_session_states_only_move_forward_and_secure_needs_ice_first(triggers):
    state = NEW
    for trigger in triggers:
        after = next_state(state, trigger)
        assert after in TRANSITIONS and ORDER.index(after) >= ORDER.index(state)
        assert after != SECURE or state in (CONNECTED, SECURE)
        state = after
    assert (state == CLOSED) == (CLOSE in triggers)


@settings(max_examples=25, deadline=None)
@given(losses=st.lists(st.booleans(), max_size=40), close_at=st.integers(0, 59))
def test_a_call_under_any_loss_moves_through_the_table_only(losses, close_at):
    pair = Pair()
    dropped = iter(losses)
    pair.drop = lambda data, to_server: next(dropped, False)
    histories: dict[str, list[str]] = {"client": [CHECKING], "server": [NEW]}
    for step in range(60):
        if step == close_at:
            pair.client.close(pair.now, "bye")
        pair.step(0.02)
        for name, session in (("client", pair.client), ("server", pair.server)):
            if session.state != histories[name][-1]:
                histories[name].append(session.state)
    for history in histories.values():
        assert [ORDER.index(s) for s in history] == sorted(ORDER.index(s) for s in history)
    assert pair.client.state == CLOSED  # closed is final: nothing reopens it


@settings(max_examples=25, deadline=None)
@given(losses=st.lists(st.booleans(), max_size=60), window=st.sampled_from([0.3, 0.6, 1.0]))
def test_by_the_connect_deadline_a_call_is_secure_or_closed_as_never_connected(losses, window):
    pair = Pair(SessionConfig(connect_timeout=window))
    dropped = iter(losses)
    pair.drop = lambda data, to_server: next(dropped, False)
    pair.run_until(lambda: not pair.now < window + 0.02, seconds=window + 0.1)
    for session in (pair.client, pair.server):
        assert session.state in (SECURE, CLOSED)
        if session.state == CLOSED:
            assert session.close_reason in ("never-connected", "peer-closed")
    assert pair.server.state == SECURE or pair.server.close_reason == "never-connected"
