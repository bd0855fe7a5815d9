"""ICE for one session, sans-IO: the ICE-lite responder (server) and a controlling checker
(client role, used by the project's own load client and tests), behind one interface.

Lite (RFC 8445 s2.5): answer Binding requests that carry `<local>:<remote>` USERNAME and a valid
MESSAGE-INTEGRITY under the local password; anything else gets no answer and is counted. The
source of the authenticated USE-CANDIDATE check is the nominated address. Consent freshness
(RFC 7675): no authenticated check for `consent_timeout` seconds ends the session.

Replays: a lite agent remembers the transaction ids of its last `REPLAY_MEMORY` checks. A
repeat from the address that sent it first is a retransmission (RFC 8489 s6.3.1: answered
again, nothing else changes); from any other address it is a replay: no answer, counted, no
nomination, no consent. Once the session has proven where media flows it `pin`s that address:
from then on checks nominate nothing and only checks from the pinned address keep consent
(a check from elsewhere is answered, and the session decides whether that address ever gets
media: see `session.py`).

Both agents are driven alike (`IceAgent`): `handle` a STUN datagram (True if it authenticated
a fresh message from the peer), `handle_timer` when `next_timer` is due, send what
`datagrams_to_send` returns; a lite agent only ever answers (from `handle`), a controlling
agent only ever checks (from `handle_timer`).
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
        self.username = f"{local_ufrag}:{remote_ufrag}".encode()
        self.key = local_pwd.encode()
        self.consent_timeout = consent_timeout
        self.started = now
        self.last_check: float | None = None
        self.nominated: Addr | None = None
        self.first_valid: Addr | None = None
        self.pinned: Addr | None = None  # set by the session once media has proven an address
        self.recent: dict[bytes, Addr] = {}  # transaction id -> first source, oldest first
        self.counters = {
            "checks": 0,
            "bad_integrity": 0,
            "bad_username": 0,
            "malformed": 0,
            "retransmits": 0,
            "replayed": 0,
        }
        self._out: list[tuple[bytes, Addr]] = []

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
        if msg.get(stun.ATTR_USERNAME) != self.username:
            self.counters["bad_username"] += 1
            return False
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
            return False
        tid = msg.transaction_id
        first_from = self.recent.get(tid)
        if first_from is not None:
            return self._repeated(tid, first_from, addr)
        self._remember(tid, addr)
        self.counters["checks"] += 1
        if self.pinned is None:
            self.last_check = now
            if self.first_valid is None:
                self.first_valid = addr
            if msg.has(stun.ATTR_USE_CANDIDATE):
                self.nominated = addr
        elif addr == self.pinned:
            self.last_check = now  # consent is the media address's alone
        self._answer(tid, addr)
        return True

    def _repeated(self, tid: bytes, first_from: Addr, addr: Addr) -> bool:
        """A transaction id seen before: answered again to the address that sent it first
        (a retransmission), dropped from anywhere else (a replay). Changes nothing."""
        if addr != first_from:
            self.counters["replayed"] += 1
            return False
        self.counters["retransmits"] += 1
        self._answer(tid, addr)
        return False

    def _remember(self, tid: bytes, addr: Addr) -> None:
        recent = self.recent
        if len(recent) >= REPLAY_MEMORY:
            del recent[next(iter(recent))]  # the oldest
        recent[tid] = addr

    def _answer(self, tid: bytes, addr: Addr) -> None:
        answer = stun.build(
            stun.BINDING_SUCCESS,
            tid,
            [(stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(addr, tid))],
            integrity_key=self.key,
        )
        self._out.append((answer, addr))

    def handle_timer(self, now: float) -> None:
        """Nothing to do: a lite agent only answers; its timer is the consent deadline."""

    def next_timer(self) -> float:
        return self.consent_deadline()

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def consent_deadline(self) -> float:
        return (
            self.last_check if self.last_check is not None else self.started
        ) + self.consent_timeout

    def expired(self, now: float) -> bool:
        return now >= self.consent_deadline()


class IceController:
    """The client side: sends checks with USE-CANDIDATE to one remote address, then consent."""

    def __init__(
        self,
        local_ufrag: str,
        remote_ufrag: str,
        remote_pwd: str,
        remote_addr: Addr,
        *,
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
        self.counters = {"checks_sent": 0, "responses": 0, "bad_integrity": 0}

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
        """Process a response to one of our checks; the first connects us. True for an
        authenticated answer to a check still pending (each is taken once)."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            return False
        if msg.msg_type != stun.BINDING_SUCCESS or msg.transaction_id not in self._pending:
            return False
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
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
        out, self._out = self._out, []
        return out

    def consent_deadline(self) -> float:
        return self.last_response + self.consent_timeout

    def expired(self, now: float) -> bool:
        return now >= self.consent_deadline()
