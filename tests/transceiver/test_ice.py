"""Full ICE on the controlling side: the client's `Session` answers the peer's connectivity
checks (RFC 8445 s7.3) with its own credentials, through the same `CheckResponder` the lite
server uses. Properties on the sans-IO agent and session, then real UDP sockets on loopback
against a full-ICE peer that starts DTLS only once its own check has been answered."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.transceiver import sdp
from voicerelay.transceiver.apps import EchoApp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.transceiver.ice import IceController, IceLite
from voicerelay.transceiver.session import CHECKING, Session
from voicerelay.wire import stun
from voicerelay.wire.addr import Addr

CERT = Certificate.generate()  # one key pair for every session here: keygen is slow
PEER_CERT = Certificate.generate()
LOCAL_UFRAG, LOCAL_PWD = "CLNT", "c" * 22  # the client's own (what it put in its offer)
REMOTE_UFRAG, REMOTE_PWD = "SRVR", "s" * 22  # the peer's (from its answer)
REMOTE: Addr = ("192.0.2.1", 3478)

ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
ufrags = st.text(ICE_CHARS, min_size=4, max_size=32)
passwords = st.text(ICE_CHARS, min_size=22, max_size=64)
ports = st.integers(1, 65535)
sources = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.ip_addresses(v=6).map(str), ports),
)
tids = st.binary(min_size=12, max_size=12)


def client_session(
    local: tuple[str, str] = (LOCAL_UFRAG, LOCAL_PWD),
    remote: tuple[str, str] = (REMOTE_UFRAG, REMOTE_PWD),
) -> Session:
    """A controlling session whose first check has already gone out (and is discarded)."""
    session = Session(
        ice_role="controlling",
        local_ufrag=local[0],
        local_pwd=local[1],
        remote_ufrag=remote[0],
        remote_pwd=remote[1],
        dtls_role="client",
        certificate=CERT,
        remote_fingerprint=PEER_CERT.fingerprint,
        now=0.0,
        remote_addr=REMOTE,
    )
    session.datagrams_to_send()
    return session


def controller() -> IceController:
    return IceController(
        LOCAL_UFRAG,
        REMOTE_UFRAG,
        REMOTE_PWD,
        REMOTE,
        local_pwd=LOCAL_PWD,
        check_interval=0.05,
        consent_interval=5.0,
        consent_timeout=30.0,
        now=0.0,
    )


def check(username: str | bytes, pwd: str, tid: bytes | None = None, **kw: bool) -> bytes:
    """A connectivity check as a controlled full agent sends it (USE-CANDIDATE if asked)."""
    user = username.encode() if isinstance(username, str) else username
    attrs = [
        (stun.ATTR_USERNAME, user),
        (stun.ATTR_PRIORITY, stun.encode_u32(0x6E7F1EFF)),
        (stun.ATTR_ICE_CONTROLLED, stun.encode_u64(7)),
    ]
    if kw.get("use_candidate"):
        attrs.append((stun.ATTR_USE_CANDIDATE, b""))
    return stun.build(
        stun.BINDING_REQUEST, tid or os.urandom(12), attrs, integrity_key=pwd.encode()
    )


def assert_answers(answer: bytes, tid: bytes, source: Addr, pwd: str) -> None:
    """`answer` is the Binding success to check `tid` from `source`, under password `pwd`."""
    msg = stun.parse(answer)
    assert msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id == tid
    assert stun.verify_integrity(answer, pwd.encode())
    assert stun.verify_fingerprint(answer)
    mapped = msg.get(stun.ATTR_XOR_MAPPED_ADDRESS)
    assert mapped is not None and stun.decode_xor_address(mapped, tid) == source


# Properties of the sans-IO side -----------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(local=st.tuples(ufrags, passwords), remote=st.tuples(ufrags, passwords), source=sources)
def test_an_authenticated_check_is_answered_under_the_clients_own_password(local, remote, source):
    session = client_session(local, remote)
    tid = os.urandom(12)
    session.receive(check(f"{local[0]}:{remote[0]}", local[1], tid), source, 1.0)
    ((answer, to),) = session.datagrams_to_send()
    assert to == source
    assert_answers(answer, tid, source, local[1])
    if remote[1] != local[1]:
        assert not stun.verify_integrity(answer, remote[1].encode())  # never the peer's
    assert session.stun_in == 1 and session.ice.counters["checks"] == 1
    # answering is all a check does: no connection, no media address, no consent
    assert session.state == CHECKING and session.ice.selected is None
    assert session.ice.consent_deadline() == 30.0


@settings(max_examples=60, deadline=None)
@given(wrong_pwd=passwords, wrong_user=ufrags, source=sources, which=st.sampled_from("PUB"))
def test_a_check_with_wrong_credentials_gets_no_answer(wrong_pwd, wrong_user, source, which):
    """Wrong password (P), wrong username (U) or both (B): nothing is sent, and it is counted."""
    session = client_session()
    good_user = f"{LOCAL_UFRAG}:{REMOTE_UFRAG}"
    pwd = LOCAL_PWD if which == "U" else wrong_pwd
    user = good_user if which == "P" else f"{wrong_user}:{REMOTE_UFRAG}"
    if pwd == LOCAL_PWD and user == good_user:
        return  # drew the right credentials after all
    session.receive(check(user, pwd), source, 1.0)
    assert session.datagrams_to_send() == []
    counters = session.ice.counters
    assert counters["bad_username"] + counters["bad_integrity"] == 1
    assert counters["checks"] == 0 and session.stun_in == 0


def test_a_check_under_the_peers_password_gets_no_answer():
    """The classic mistake: answering with (or accepting) the remote password."""
    session = client_session()
    session.receive(check(f"{LOCAL_UFRAG}:{REMOTE_UFRAG}", REMOTE_PWD), REMOTE, 1.0)
    assert session.datagrams_to_send() == []
    assert session.ice.counters["bad_integrity"] == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), first=st.integers(0, 3))
def test_any_bytes_into_the_controlling_side_never_raise(data, first):
    """Anything in the STUN range (first byte 0-3) reaches the agent; none of it is answered."""
    datagram = bytes([first]) + data
    session = client_session()
    session.receive(datagram, REMOTE, 1.0)
    assert session.datagrams_to_send() == []
    ice = controller()
    assert ice.handle(datagram, REMOTE, 1.0) is False
    assert ice.datagrams_to_send() == []


RESERVED = {stun.ATTR_USERNAME, stun.ATTR_MESSAGE_INTEGRITY, stun.ATTR_FINGERPRINT}
other_attrs = st.lists(
    st.tuples(st.integers(0, 0xFFFF).filter(lambda k: k not in RESERVED), st.binary(max_size=24)),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(
    msg_type=st.sampled_from(
        [stun.BINDING_REQUEST, stun.BINDING_SUCCESS, stun.BINDING_ERROR, stun.BINDING_INDICATION]
    )
    | st.integers(0, 0x3FFF),
    user=st.sampled_from([f"{LOCAL_UFRAG}:{REMOTE_UFRAG}", f"{REMOTE_UFRAG}:{LOCAL_UFRAG}", None]),
    key=st.sampled_from([LOCAL_PWD, REMOTE_PWD, None]),
    attrs=other_attrs,
    tid=tids,
    source=sources,
)
def test_only_authenticated_binding_requests_are_answered(msg_type, user, key, attrs, tid, source):
    """Well-formed STUN of any type and attributes: the controlling session sends a Binding
    success exactly when the message is a Binding request for our ufrag pair under our own
    password, and then only that answer, to the source; nothing raises."""
    head = [(stun.ATTR_USERNAME, user.encode())] if user is not None else []
    key_bytes = key.encode() if key is not None else None
    datagram = stun.build(msg_type, tid, head + attrs, integrity_key=key_bytes)
    session = client_session()
    session.receive(datagram, source, 1.0)
    out = session.datagrams_to_send()
    authentic = (
        msg_type == stun.BINDING_REQUEST
        and user == f"{LOCAL_UFRAG}:{REMOTE_UFRAG}"
        and key == LOCAL_PWD
    )
    assert len(out) == int(authentic)
    for answer, to in out:
        assert to == source
        assert_answers(answer, tid, source, LOCAL_PWD)


@settings(max_examples=60, deadline=None)
@given(source=sources, tid=tids, use_candidate=st.booleans())
def test_both_roles_answer_through_one_responder(source, tid, use_candidate):
    """The lite server and the controlling client answer the same check with the same bytes
    (one function answers a Binding request, whichever role asks)."""
    lite = IceLite(LOCAL_UFRAG, LOCAL_PWD, REMOTE_UFRAG, consent_timeout=30.0, now=0.0)
    full = controller()
    datagram = check(f"{LOCAL_UFRAG}:{REMOTE_UFRAG}", LOCAL_PWD, tid, use_candidate=use_candidate)
    assert lite.handle(datagram, source, 1.0) and full.handle(datagram, source, 1.0)
    assert lite.datagrams_to_send() == full.datagrams_to_send()


def test_a_retransmission_is_answered_again_a_replay_from_elsewhere_is_not():
    ice = controller()
    ice.handle_timer(0.0)
    ice.datagrams_to_send()  # our own first check
    datagram = check(f"{LOCAL_UFRAG}:{REMOTE_UFRAG}", LOCAL_PWD)
    assert ice.handle(datagram, REMOTE, 1.0) is True
    assert ice.handle(datagram, REMOTE, 1.1) is False  # the peer's retransmission
    assert [to for _, to in ice.datagrams_to_send()] == [REMOTE, REMOTE]
    assert ice.handle(datagram, ("203.0.113.9", 4000), 1.2) is False  # a replay
    assert ice.datagrams_to_send() == []
    assert (ice.counters["retransmits"], ice.counters["replayed"]) == (1, 1)


def test_answers_and_checks_leave_together_and_the_call_still_connects():
    """Answering the peer's checks does not disturb the client's own: its next check goes
    out on time and an answer to it still connects the call."""
    ice = controller()
    ice.handle_timer(0.0)
    ((first, _),) = ice.datagrams_to_send()
    ice.handle(check(f"{LOCAL_UFRAG}:{REMOTE_UFRAG}", LOCAL_PWD), REMOTE, 0.01)
    ice.handle_timer(0.05)
    out = ice.datagrams_to_send()
    assert [stun.parse(d).msg_type for d, _ in out] == [stun.BINDING_SUCCESS, stun.BINDING_REQUEST]
    tid = stun.parse(first).transaction_id
    forged = stun.build(stun.BINDING_SUCCESS, tid, [], integrity_key=LOCAL_PWD.encode())
    assert ice.handle(forged, REMOTE, 0.06) is False  # an answer must use the peer's password
    assert ice.counters["bad_response_integrity"] == 1 and ice.selected is None
    good = stun.build(stun.BINDING_SUCCESS, tid, [], integrity_key=REMOTE_PWD.encode())
    assert ice.handle(good, REMOTE, 0.07) is True and ice.selected == REMOTE


# Real sockets: a full-ICE peer that needs its checks answered -----------------------------------
class FullIcePeer(asyncio.DatagramProtocol):
    """A full ICE agent in the controlled role, on a real UDP socket: a lite `Session` answers
    the client's checks and runs DTLS (as DTLS client, `a=setup:active`, as Janus does) and the
    echo, but it sends its own checks to the client (the peer-reflexive address the client's
    first check came from) and lets nothing but STUN in or out until one of them is answered
    with the client's password and the right XOR-MAPPED-ADDRESS."""

    def __init__(self, check_pwd: str | None = None) -> None:
        self.check_pwd = check_pwd  # None: the client's real password (from its offer)
        self.transport: asyncio.DatagramTransport | None = None
        self.session: Session | None = None
        self.client: Addr | None = None
        self.confirmed = asyncio.get_running_loop().create_future()
        self.held: list[tuple[bytes, Addr]] = []  # DTLS the lite session wrote before that
        self.dropped = 0  # non-STUN from the client before that
        self.pending: set[bytes] = set()
        self._username = self._key = b""
        self._ticker: asyncio.Task | None = None

    @property
    def addr(self) -> Addr:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def answer(self, offer_text: str) -> str:
        """Signaling: take the client's offer, return this peer's (full-ICE) answer."""
        offer = sdp.parse_offer(offer_text)
        self._username = f"{offer.ice_ufrag}:PEER".encode()
        self._key = (self.check_pwd or offer.ice_pwd).encode()
        self.session = Session(
            ice_role="lite",
            local_ufrag="PEER",
            local_pwd="p" * 22,
            remote_ufrag=offer.ice_ufrag,
            remote_pwd=offer.ice_pwd,
            dtls_role="client",
            certificate=PEER_CERT,
            remote_fingerprint=offer.fingerprint,
            now=time.monotonic(),
            app=EchoApp(4242),
        )
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        answer = sdp.build_answer(
            offer,
            ice_ufrag="PEER",
            ice_pwd="p" * 22,
            fingerprint=PEER_CERT.fingerprint,
            dtls_role="client",
            candidate=self.addr,
            ssrc=4242,
            cname="peer",
        )
        return answer.replace("a=ice-lite\r\n", "")  # a full agent

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        session = self.session
        if session is None:
            return
        if data and data[0] < 4:
            self._stun(data, addr)
        elif not self.confirmed.done():
            self.dropped += 1
            return
        else:
            session.receive(data, addr, time.monotonic())
        self._flush()

    def _stun(self, data: bytes, addr: Addr) -> None:
        assert self.session is not None
        try:
            msg = stun.parse(data)
        except stun.StunError:
            return
        if msg.msg_type == stun.BINDING_SUCCESS and msg.transaction_id in self.pending:
            mapped = msg.get(stun.ATTR_XOR_MAPPED_ADDRESS)
            if (
                stun.verify_integrity(data, self._key)
                and stun.verify_fingerprint(data)
                and mapped is not None
                and stun.decode_xor_address(mapped, msg.transaction_id) == self.addr
                and not self.confirmed.done()
            ):
                self.confirmed.set_result(addr)
            return
        before = self.session.stun_in
        self.session.receive(data, addr, time.monotonic())
        if self.session.stun_in > before and self.client is None:
            self.client = addr  # peer-reflexive: the offer carried no candidate
            self._send_check()

    def _send_check(self) -> None:
        assert self.transport is not None and self.client is not None
        tid = os.urandom(12)
        self.pending.add(tid)
        attrs = [
            (stun.ATTR_USERNAME, self._username),
            (stun.ATTR_PRIORITY, stun.encode_u32(0x6E7F1EFF)),
            (stun.ATTR_ICE_CONTROLLED, stun.encode_u64(7)),
        ]
        datagram = stun.build(stun.BINDING_REQUEST, tid, attrs, integrity_key=self._key)
        self.transport.sendto(datagram, self.client)

    def _flush(self) -> None:
        assert self.session is not None and self.transport is not None
        for data, to in self.session.datagrams_to_send():
            if self.confirmed.done() or data[0] < 4:
                self.transport.sendto(data, to)
            else:
                self.held.append((data, to))
        if self.confirmed.done() and self.held:
            held, self.held = self.held, []
            for data, to in held:
                self.transport.sendto(data, to)

    async def _tick(self) -> None:
        """Every 10 ms: the lite session's timers (DTLS retransmission, consent) and, until
        answered, our next check (every 50 ms)."""
        ticks = 0
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
            assert self.session is not None
            now = time.monotonic()
            due = self.session.next_timer()
            if due is not None and now >= due:
                self.session.handle_timer(now)
            if self.client is not None and not self.confirmed.done() and ticks % 5 == 0:
                self._send_check()
            self._flush()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.transport is not None:
            self.transport.close()


class PeerSignaledCall(ClientCall):
    """The project's `ClientCall` whose signaling is the in-test peer's `answer` (no HTTP)."""

    peer: FullIcePeer

    async def exchange(self, http, url: str, offer: str) -> str:
        return await self.peer.answer(offer)


async def open_call(check_pwd: str | None = None) -> tuple[PeerSignaledCall, FullIcePeer]:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(
        lambda: FullIcePeer(check_pwd), local_addr=("127.0.0.1", 0)
    )
    call = PeerSignaledCall(CERT)
    call.peer = peer
    await call.connect(None, "", CallOptions(keep_packets=False))  # type: ignore[arg-type]
    return call, peer


async def test_a_full_ice_peer_gets_its_checks_answered_over_udp():
    call, peer = await open_call()
    try:
        await asyncio.wait_for(call.secure, 5.0)
        assert peer.confirmed.result() == call.local_addr  # answered from the call's socket
        assert call.session is not None and call.session.ice.counters["checks"] >= 1
        deadline = time.monotonic() + 5.0
        timestamp = 0
        while call.rtp_received == 0:  # the echo flows only over what full ICE set up
            assert time.monotonic() < deadline, "no echo within 5 s of DTLS"
            timestamp += 960
            call.send_audio(b"voice", timestamp)
            await asyncio.sleep(0.02)
    finally:
        call.close()
        peer.close()


async def test_a_peer_whose_checks_fail_authentication_never_gets_dtls():
    """The control: the same peer checking under a wrong password is never answered, so it
    never starts DTLS (and the client counted every check it refused)."""
    call, peer = await open_call(check_pwd="w" * 22)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(call.secure), 1.0)
        assert not peer.confirmed.done() and peer.held  # DTLS waiting on ICE
        assert call.session is not None
        assert call.session.ice.counters["bad_integrity"] >= 5
        assert call.session.ice.counters["checks"] == 0
    finally:
        call.close()
        peer.close()
    with pytest.raises(ConnectionError):  # closed before it was ever secure
        call.secure.result()
