"""ICE for one session, sans-IO: the ICE-lite responder (server) and a controlling checker
(client role, used by the project's own load client and tests), behind one interface.

Lite (RFC 8445 s2.5): answer Binding requests that carry `<local>:<remote>` USERNAME and a valid
MESSAGE-INTEGRITY under the local password; anything else gets no answer and is counted. The
source of the authenticated USE-CANDIDATE check is the nominated address. Consent freshness
(RFC 7675): no authenticated check for `consent_timeout` seconds ends the session.

Both agents are driven alike (`IceAgent`): `handle` a STUN datagram, `handle_timer` when
`next_timer` is due, send what `datagrams_to_send` returns; a lite agent only ever answers
(from `handle`), a controlling agent only ever checks (from `handle_timer`).
"""

from __future__ import annotations

import os
from typing import Protocol

from voicerelay.wire import stun
from voicerelay.wire.addr import Addr


class IceAgent(Protocol):
    """What a session drives, whichever side of ICE it is on."""

    counters: dict[str, int]

    @property
    def selected(self) -> Addr | None:
        """Where media goes (None: not connected yet)."""
        ...

    def handle(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one STUN datagram from `addr`."""
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
        self.counters = {"checks": 0, "bad_integrity": 0, "bad_username": 0, "malformed": 0}
        self._out: list[tuple[bytes, Addr]] = []

    @property
    def selected(self) -> Addr | None:
        """Where media goes: the nominated address, else the first that checked in."""
        return self.nominated or self.first_valid

    def handle(self, data: bytes, addr: Addr, now: float) -> None:
        """Process a STUN datagram; an authenticated check is answered to `addr`."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return
        if msg.msg_type != stun.BINDING_REQUEST:
            return  # indications and stray responses need no answer
        if msg.get(stun.ATTR_USERNAME) != self.username:
            self.counters["bad_username"] += 1
            return
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
            return
        self.counters["checks"] += 1
        self.last_check = now
        if self.first_valid is None:
            self.first_valid = addr
        if msg.has(stun.ATTR_USE_CANDIDATE):
            self.nominated = addr
        answer = stun.build(
            stun.BINDING_SUCCESS,
            msg.transaction_id,
            [(stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(addr, msg.transaction_id))],
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

    def handle(self, data: bytes, addr: Addr, now: float) -> None:
        """Process a response to one of our checks; the first connects us."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            return
        if msg.msg_type != stun.BINDING_SUCCESS or msg.transaction_id not in self._pending:
            return
        if not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
            return
        self._pending.discard(msg.transaction_id)
        self.counters["responses"] += 1
        self.last_response = now
        if not self.connected:
            self.connected = True
            self._next_check = now + self.consent_interval

    def next_timer(self) -> float:
        return min(self._next_check, self.consent_deadline())

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def consent_deadline(self) -> float:
        return self.last_response + self.consent_timeout

    def expired(self, now: float) -> bool:
        return now >= self.consent_deadline()
