"""ICE for one session, sans-IO: the ICE-lite responder (server) and a controlling full agent
(client role, used by the project's own load client and tests), behind one interface.

Answering checks (RFC 8445 s7.3) is one piece both agents own: `CheckResponder`. A Binding
request is answered when its USERNAME is `<local ufrag>:<remote ufrag>` and its
MESSAGE-INTEGRITY verifies under the local password (the one this agent put in its own SDP);
the answer is a Binding success to the request's source carrying XOR-MAPPED-ADDRESS of that
source, MESSAGE-INTEGRITY under the same password and FINGERPRINT. Anything else gets no
answer and is counted: a request that does not parse (`malformed`), names other ufrags
(`bad_username`) or fails its integrity check (`bad_integrity`). RFC 8489 s9.1.3 would answer
the last two with 400/401; an ICE agent may drop them instead (RFC 8445 s7.3), and we do: no
reflection towards forged sources, nothing for a prober to learn.

Replays: a responder remembers the transaction ids of its last `REPLAY_MEMORY` checks. A
repeat from the address that sent it first is a retransmission (RFC 8489 s6.3.1: answered
again, nothing else changes); from any other address it is a replay: no answer, counted.

Lite (RFC 8445 s2.5, the server): answers checks and nothing else. The source of the
authenticated USE-CANDIDATE check is the nominated address; consent freshness (RFC 7675): no
authenticated check for `consent_timeout` seconds ends the session. A replay nominates nothing
and keeps no consent. Once the session has proven where media flows it `pin`s that address:
from then on checks nominate nothing and only checks from the pinned address keep consent (a
check from elsewhere is answered, and the session decides whether that address ever gets
media: see `session.py`).

Controlling (the client): a full agent with one remote candidate. It sends checks with
USE-CANDIDATE to that address until one is answered, then one every `consent_interval`
(consent: no answer for `consent_timeout` ends the session), and it answers the peer's checks
as above, which a full peer (aiortc, Janus) needs before it nominates the pair and starts
DTLS. Answering changes nothing else: consent is the answers to its own checks, and media
stays with the one remote address. Roles are fixed by the offer (the client offers, so it
controls; RFC 8445 s6.1.1): role conflicts (s7.3.1.1) are not resolved.

Both agents are driven alike (`IceAgent`): `handle` a STUN datagram (True if it authenticated
a fresh message from the peer), `handle_timer` when `next_timer` is due, send what
`datagrams_to_send` returns (answers from `handle`, a controlling agent's checks from
`handle_timer`).
"""

from __future__ import annotations

import os
from typing import Protocol

from voicerelay.wire import stun
from voicerelay.wire.addr import Addr

REPLAY_MEMORY = 64  # transaction ids a lite agent remembers (a check every ~5 s: minutes)


class IceAgent(Protocol):
    """What a session drives, whichever side of ICE it is on."""

    counters: dict[str, int]

    @property
    def selected(self) -> Addr | None:
        """Where media goes (None: not connected yet)."""
        ...

    def handle(self, data: bytes, addr: Addr, now: float) -> bool:
        """Process one STUN datagram from `addr`; True if it was an authenticated message from
        the peer that this agent had not seen before (a fresh check, or an answer to ours)."""
        ...

    def pin(self, addr: Addr) -> None:
        """Media is proven to flow with `addr`: from now on checks select nothing else and
        only checks from `addr` keep consent."""
        ...

    def handle_timer(self, now: float) -> None:
        """Do what is due by `now`."""
        ...

    def next_timer(self) -> float:
        """When `handle_timer` is next due (the consent deadline at the latest)."""
        ...

    def expired(self, now: float) -> bool:
        """True once consent has lapsed: the session must end."""
        ...

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """STUN datagrams to send and where to (drained each call)."""
        ...


class CheckResponder:
    """Answers the peer's connectivity checks with this agent's own credentials: the one owner
    of "answer a Binding request", used by both agents (see the module docstring).

    `counters` is the agent's dict: this adds and keeps "checks" (fresh authenticated checks
    answered), "bad_username", "bad_integrity", "retransmits" and "replayed"."""

    def __init__(
        self, local_ufrag: str, local_pwd: str, remote_ufrag: str, counters: dict[str, int]
    ) -> None:
        self.username = f"{local_ufrag}:{remote_ufrag}".encode()
        self.key = local_pwd.encode()
        self.recent: dict[bytes, Addr] = {}  # transaction id -> first source, oldest first
        self.counters = counters
        for name in ("checks", "bad_username", "bad_integrity", "retransmits", "replayed"):
            counters.setdefault(name, 0)
        self.answers: list[tuple[bytes, Addr]] = []

    def respond(self, data: bytes, msg: stun.StunMessage, addr: Addr) -> bool:
        """Take one Binding request (`msg`, parsed from `data`) that came from `addr`: queue
        the answer if it is authenticated and not a replay. True only for a fresh check, which
        the agent then acts on; a retransmission is answered again and returns False."""
        if msg.get(stun.ATTR_USERNAME) != self.username:
            self.counters["bad_username"] += 1
            return False
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
            return False
        tid = msg.transaction_id
        first_from = self.recent.get(tid)
        if first_from is not None:
            if addr != first_from:
                self.counters["replayed"] += 1
            else:
                self.counters["retransmits"] += 1
                self.answers.append((binding_success(tid, addr, self.key), addr))
            return False
        self._remember(tid, addr)
        self.counters["checks"] += 1
        self.answers.append((binding_success(tid, addr, self.key), addr))
        return True

    def _remember(self, tid: bytes, addr: Addr) -> None:
        recent = self.recent
        if len(recent) >= REPLAY_MEMORY:
            del recent[next(iter(recent))]  # the oldest
        recent[tid] = addr

    def take(self) -> list[tuple[bytes, Addr]]:
        """The answers queued since the last call."""
        out, self.answers = self.answers, []
        return out


def binding_success(transaction_id: bytes, source: Addr, key: bytes) -> bytes:
    """The answer to an authenticated check from `source`: XOR-MAPPED-ADDRESS of the source,
    MESSAGE-INTEGRITY under `key` (the answering agent's own password), FINGERPRINT."""
    return stun.build(
        stun.BINDING_SUCCESS,
        transaction_id,
        [(stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(source, transaction_id))],
        integrity_key=key,
    )


class IceLite:
    """The server side: answers checks, tracks nomination and consent."""

    def __init__(
        self,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        consent_timeout: float,
        now: float,
    ) -> None:
        self.consent_timeout = consent_timeout
        self.started = now
        self.last_check: float | None = None
        self.nominated: Addr | None = None
        self.first_valid: Addr | None = None
        self.pinned: Addr | None = None  # set by the session once media has proven an address
        self.counters = {"malformed": 0}
        self.responder = CheckResponder(local_ufrag, local_pwd, remote_ufrag, self.counters)

    @property
    def recent(self) -> dict[bytes, Addr]:
        """Transaction ids of the last checks taken, with the address each first came from."""
        return self.responder.recent

    @property
    def selected(self) -> Addr | None:
        """Where media goes: the pinned address, else the nominated one, else the first that
        checked in."""
        return self.pinned or self.nominated or self.first_valid

    def pin(self, addr: Addr) -> None:
        self.pinned = addr

    def handle(self, data: bytes, addr: Addr, now: float) -> bool:
        """Process a STUN datagram; an authenticated check is answered to `addr`. True for a
        fresh authenticated check (a retransmission or a replay is not)."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return False
        if msg.msg_type != stun.BINDING_REQUEST:
            return False  # indications and stray responses need no answer
        if not self.responder.respond(data, msg, addr):
            return False
        if self.pinned is None:
            self.last_check = now
            if self.first_valid is None:
                self.first_valid = addr
            if msg.has(stun.ATTR_USE_CANDIDATE):
                self.nominated = addr
        elif addr == self.pinned:
            self.last_check = now  # consent is the media address's alone
        return True

    def handle_timer(self, now: float) -> None:
        """Nothing to do: a lite agent only answers; its timer is the consent deadline."""

    def next_timer(self) -> float:
        return self.consent_deadline()

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        return self.responder.take()

    def consent_deadline(self) -> float:
        return (
            self.last_check if self.last_check is not None else self.started
        ) + self.consent_timeout

    def expired(self, now: float) -> bool:
        return now >= self.consent_deadline()


class IceController:
    """The client side, a full agent: sends checks with USE-CANDIDATE to one remote address,
    then consent checks; answers the peer's checks with its own credentials."""

    def __init__(
        self,
        local_ufrag: str,
        remote_ufrag: str,
        remote_pwd: str,
        remote_addr: Addr,
        *,
        local_pwd: str,
        check_interval: float,
        consent_interval: float,
        consent_timeout: float,
        now: float,
    ) -> None:
        self.username = f"{remote_ufrag}:{local_ufrag}".encode()
        self.key = remote_pwd.encode()
        self.remote = remote_addr
        self.check_interval = check_interval
        self.consent_interval = consent_interval
        self.consent_timeout = consent_timeout
        self.tiebreaker = int.from_bytes(os.urandom(8), "big")
        self.connected = False
        self.last_response = now
        self._pending: set[bytes] = set()
        self._next_check = now
        self._out: list[tuple[bytes, Addr]] = []
        self.counters = {
            "checks_sent": 0,
            "responses": 0,
            "bad_response_integrity": 0,
            "malformed": 0,
        }
        self.responder = CheckResponder(local_ufrag, local_pwd, remote_ufrag, self.counters)

    @property
    def selected(self) -> Addr | None:
        return self.remote if self.connected else None

    def handle_timer(self, now: float) -> None:
        """Send a check (with USE-CANDIDATE) to the remote address if one is due."""
        if now < self._next_check:
            return
        self._next_check = now + (self.consent_interval if self.connected else self.check_interval)
        tid = os.urandom(12)
        if len(self._pending) > 64:
            self._pending.clear()
        self._pending.add(tid)
        self.counters["checks_sent"] += 1
        check = stun.build(
            stun.BINDING_REQUEST,
            tid,
            [
                (stun.ATTR_USERNAME, self.username),
                (stun.ATTR_PRIORITY, stun.encode_u32(0x6E0001FF)),
                (stun.ATTR_ICE_CONTROLLING, stun.encode_u64(self.tiebreaker)),
                (stun.ATTR_USE_CANDIDATE, b""),
            ],
            integrity_key=self.key,
        )
        self._out.append((check, self.remote))

    def handle(self, data: bytes, addr: Addr, now: float) -> bool:
        """Answer the peer's check, or take an answer to one of ours (the first connects us).
        True for a fresh authenticated check or an authenticated answer to a check still
        pending (each is taken once)."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return False
        if msg.msg_type == stun.BINDING_REQUEST:
            return self.responder.respond(data, msg, addr)
        if msg.msg_type != stun.BINDING_SUCCESS or msg.transaction_id not in self._pending:
            return False
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_response_integrity"] += 1
            return False
        self._pending.discard(msg.transaction_id)
        self.counters["responses"] += 1
        self.last_response = now
        if not self.connected:
            self.connected = True
            self._next_check = now + self.consent_interval
        return True

    def pin(self, addr: Addr) -> None:
        """Nothing to do: a controlling agent talks to one remote address, which never moves."""

    def next_timer(self) -> float:
        return min(self._next_check, self.consent_deadline())

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Answers to the peer's checks, then our own checks."""
        out, self._out = self._out, []
        return self.responder.take() + out if self.responder.answers else out

    def consent_deadline(self) -> float:
        return self.last_response + self.consent_timeout

    def expired(self, now: float) -> bool:
        return now >= self.consent_deadline()
