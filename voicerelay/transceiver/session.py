"""One call, sans-IO: ICE + DTLS + SRTP + RTCP + a voice app, driven by datagrams and a clock.

    session.receive(datagram, addr, now)      # whatever arrived for this call
    session.datagrams_to_send()               # [(datagram, addr)] to put on the wire
    session.next_timer() / handle_timer(now)  # retransmission, consent, RTCP, the app's pacing
    session.events()                          # IceConnected, AddressChanged, AddressChecked,
                                              # DtlsConnected, RtpReceived, SessionClosed

Role "lite" is the server (answers checks, hands audio to the app); role "controlling" is a
client, a full ICE agent (sends checks, answers the peer's, sends media with `send_rtp`). No
sockets or threads here, and every time is the injected `now`, with one exception owned by
`dtls.py`: OpenSSL times DTLS retransmission on its own clock (nothing pyOpenSSL exposes can
move it); the session only sees its deadline mapped onto `now`, so on a fake clock a lost DTLS
flight is resent after that much real time.

`state` moves only through `TRANSITIONS`: new -> checking (a client's first check) ->
connected (ICE selected an address) -> secure (DTLS up, SRTP keyed) -> closed (from anywhere).
A call that is not secure within `connect_timeout` of its creation closes: never-connected.

Where media goes. Until the call is secure, ICE decides (ICE-lite: the source of the latest
authenticated USE-CANDIDATE check). Once it is secure the address is pinned, and a server
(role "lite") follows the client to a new address only on proof from that address: SRTP or
SRTCP that unprotects there, or DTLS application data from it; never on a STUN check alone
(replayed checks are dropped by the ICE agent). An authenticated check from another address
raises `AddressChecked` so that address's media can reach this session and prove itself; a
NAT rebinding (checks and media from a new port) moves the call with its first media packet.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from voicerelay.transceiver import dtls
from voicerelay.transceiver.apps import VoiceApp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.dtls import DEFAULT_PROFILES, DtlsEndpoint
from voicerelay.transceiver.ice import IceAgent, IceController, IceLite
from voicerelay.transceiver.rtp import (
    RTCP_RR,
    RTCP_SR,
    ReceiveStats,
    RtpError,
    build_receiver_report,
    build_sender_report,
    ntp_from_seconds,
    ntp_middle,
    parse_rtcp,
)
from voicerelay.transceiver.srtp import SrtpContext, srtp_context
from voicerelay.wire.addr import Addr
from voicerelay.wire.demux import IS_DTLS, IS_RTCP_SECOND, IS_RTP, IS_STUN

_RTP_FIELDS = struct.Struct("!HII")  # seq, timestamp, ssrc at offset 2
COUNTER_NAMES = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "rtp_in",
    "rtp_out",
    "rtcp_in",
    "rtcp_out",
    "dropped_before_secure",
    "dropped_unknown",
    "dropped_wrong_address",
    "srtp_errors",
    "rtcp_errors",
    "stun_in",
    "dtls_in",
    "authenticated_in",
    "address_moves",
)

# Session states (`Session.state`), in the order a call goes through them.
NEW = "new"
CHECKING = "checking"
CONNECTED = "connected"
SECURE = "secure"
CLOSED = "closed"
# What moves them:
CHECKS_SENT = "checks-sent"  # our ICE agent sent a check (a client's, from its first timer)
ICE_SELECTED = "ice-selected"  # ICE selected a first address for media
DTLS_UP = "dtls-up"  # the handshake finished and SRTP is keyed
CLOSE = "close"  # closed by us, the peer, DTLS failure or lapsed consent
TRANSITIONS: dict[str, dict[str, str]] = {
    NEW: {CHECKS_SENT: CHECKING, ICE_SELECTED: CONNECTED, CLOSE: CLOSED},
    CHECKING: {ICE_SELECTED: CONNECTED, CLOSE: CLOSED},
    CONNECTED: {DTLS_UP: SECURE, CLOSE: CLOSED},
    SECURE: {CLOSE: CLOSED},
    CLOSED: {},
}


def next_state(state: str, trigger: str) -> str:
    """The state after `trigger`; a trigger the state does not list leaves it as it is
    (checks go on after connecting; an address re-nominated keeps the call secure)."""
    return TRANSITIONS[state].get(trigger, state)


@dataclass
class SessionConfig:
    consent_timeout: float = 30.0
    connect_timeout: float = 10.0  # not secure this long after creation -> never-connected
    check_interval: float = 0.05
    consent_interval: float = 5.0
    mtu: int = 1200
    rtcp_interval: float = 5.0
    rtcp_first: float = 1.0  # first report this soon after DTLS, so RTT and loss show early
    srtp_profiles: bytes = DEFAULT_PROFILES  # OpenSSL use_srtp list, to force one in tests


@dataclass
class IceConnected:
    addr: Addr


@dataclass
class AddressChanged:
    """Media now goes to `addr` (first nomination included); None once the call is closed."""

    addr: Addr | None


@dataclass
class AddressChecked:
    """An authenticated, fresh ICE check came from `addr`, which is not where media goes: its
    media may now reach this session, which moves there only once that media authenticates."""

    addr: Addr


@dataclass
class DtlsConnected:
    profile: str


@dataclass
class RtpReceived:
    packet: bytes


@dataclass
class SessionClosed:
    reason: str


Event = IceConnected | AddressChanged | AddressChecked | DtlsConnected | RtpReceived | SessionClosed


class Session:
    """The whole state of one call.

    Media (SRTP/SRTCP in, `send_rtp` out) changes no state and, with an app whose
    `moves_timer` is False (echo), moves no timer and raises no event, except the rare media
    packet that moves the call to a new client address (`AddressChanged`). The server's hot
    path relies on that: after media that left `pending_events` (what `events()` will return,
    a plain list so that testing it costs nothing) empty, it only transmits (see
    `TransceiverServer.datagram_received`). The app's own timer (a decoded-audio app paces its
    output on it) is part of `next_timer`. Counters are plain attributes (named in
    `COUNTER_NAMES`); `counters` reads them as a dict. `authenticated_in` counts datagrams
    that proved to come from the peer (`stun_in`: fresh authenticated STUN messages; `rtp_in`,
    `rtcp_in`: SRTP/SRTCP that unprotected; `dtls_in`: DTLS that completed the handshake or
    carried data): the server re-points a client's relay only after one.
    """

    def __init__(
        self,
        *,
        ice_role: str,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        dtls_role: str,
        certificate: Certificate,
        remote_fingerprint: str,
        now: float,
        app: VoiceApp | None = None,
        config: SessionConfig | None = None,
        remote_addr: Addr | None = None,
        ssrc: int | None = None,
    ) -> None:
        self.config = cfg = config or SessionConfig()
        self.ice_role = ice_role
        self._follows_peer = ice_role == "lite"  # a server follows a client that moves
        self._connect_deadline: float | None = now + cfg.connect_timeout  # None once secure
        self.ice: IceAgent = _ice_agent(
            ice_role, local_ufrag, local_pwd, remote_ufrag, remote_pwd, remote_addr, cfg, now
        )
        self.dtls = DtlsEndpoint(
            dtls_role, certificate, remote_fingerprint, mtu=cfg.mtu, profiles=cfg.srtp_profiles
        )
        self.app = app
        self.ssrc = ssrc if ssrc is not None else int.from_bytes(os.urandom(4), "big")
        self.srtp: SrtpContext | None = None
        self.state = NEW
        self.close_reason: str | None = None
        self.rx = ReceiveStats()
        self.rtt: float | None = None
        self._out: list[tuple[bytes, Addr]] = []
        self.pending_events: list[Event] = []  # read-only outside: `events()` takes them
        self._next_rtcp: float | None = None
        self._media_to: Addr | None = None  # the selected address while the call is open
        self._sent_octets = 0  # RTP payload octets for sender reports (packets: rtp_out)
        self._last_sent_rtp = b""  # its timestamp goes into sender reports
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.rtp_in = self.rtp_out = self.rtcp_in = self.rtcp_out = 0
        self.dropped_before_secure = self.dropped_unknown = self.dropped_wrong_address = 0
        self.srtp_errors = self.rtcp_errors = 0
        self.stun_in = self.dtls_in = self.address_moves = 0
        self._ice_timer(now)  # a client's first check goes out at once

    def _move(self, trigger: str) -> None:
        self.state = next_state(self.state, trigger)

    # Inputs -----------------------------------------------------------------------------------
    @property
    def authenticated_in(self) -> int:
        """Datagrams that proved to come from the peer (see the class docstring)."""
        return self.stun_in + self.dtls_in + self.rtp_in + self.rtcp_in

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of this session's counters by name."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed one datagram that arrived for this call. Never raises on bad input."""
        if self.state == CLOSED:
            return
        self.packets_in += 1
        self.bytes_in += len(data)
        first = data[0] if data else 255  # RFC 7983 demultiplexing, media first
        if IS_RTP[first]:
            self._receive_media(data, addr, now)
        elif IS_STUN[first]:
            self._receive_stun(data, addr, now)
        elif IS_DTLS[first]:
            self._receive_dtls(data, addr, now)
        else:
            self.dropped_unknown += 1

    def _receive_stun(self, data: bytes, addr: Addr, now: float) -> None:
        ice = self.ice
        was_connected = ice.selected is not None
        fresh = ice.handle(data, addr, now)
        # Answers to the peer's checks (the only output of `handle`) are not in
        # packets_out/bytes_out: they never were, and the counters stay as they are.
        self._out += ice.datagrams_to_send()
        if fresh:
            self.stun_in += 1
        if self.srtp is None:  # until the call is secure, ICE decides where media goes
            self._set_media_to(ice.selected)
            if not was_connected and ice.selected is not None:
                self._on_ice_connected(now)
        elif fresh and addr != self._media_to and self._follows_peer:
            self.pending_events.append(AddressChecked(addr))

    def _set_media_to(self, addr: Addr | None) -> None:
        if addr != self._media_to:
            self._media_to = addr
            self.pending_events.append(AddressChanged(addr))

    def _follow(self, addr: Addr) -> None:
        """The peer proved `addr` (authenticated media from it): media goes there now."""
        self.address_moves += 1
        self._set_media_to(addr)
        self.ice.pin(addr)

    def _on_ice_connected(self, now: float) -> None:
        assert self.ice.selected is not None
        self._move(ICE_SELECTED)
        self.pending_events.append(IceConnected(self.ice.selected))
        if self.dtls.role == "client":
            self.dtls.start(now)
            self._send_dtls()

    def _receive_dtls(self, data: bytes, addr: Addr, now: float) -> None:
        if self.ice.selected is None:
            self.dropped_before_secure += 1
            return
        before = self.dtls.state
        carried = self.dtls.receive(data, now)
        if carried and self.dtls.state == dtls.CONNECTED:
            self.dtls_in += 1  # application data: only the peer holds the keys
            if addr != self._media_to and self._follows_peer and self.srtp is not None:
                self._follow(addr)
        self._send_dtls()
        self._after_dtls(before, now)

    def _after_dtls(self, before: str, now: float) -> None:
        state = self.dtls.state
        if state == before:
            return
        if state == dtls.CONNECTED and self.dtls.srtp_keys is not None:
            self.dtls_in += 1  # the handshake finished: the peer is who it said
            self.srtp = srtp_context(self.dtls.srtp_keys)
            if self._media_to is not None:
                self.ice.pin(self._media_to)  # from now on only proof moves it
            self._connect_deadline = None
            self._move(DTLS_UP)
            self._next_rtcp = now + min(self.config.rtcp_first, self.config.rtcp_interval)
            self.pending_events.append(DtlsConnected(self.dtls.srtp_keys.profile))
        elif state == dtls.FAILED:
            self.close(now, self.dtls.error or "dtls-failed")
        elif state == dtls.CLOSED:
            self.close(now, "peer-closed")

    def _receive_media(self, data: bytes, addr: Addr, now: float) -> None:
        srtp = self.srtp
        if srtp is None:
            self.dropped_before_secure += 1
            return
        elsewhere = addr != self._media_to
        if elsewhere and not self._follows_peer:
            self.dropped_wrong_address += 1
            return
        if len(data) > 1 and IS_RTCP_SECOND[data[1]]:  # RTCP under rtcp-mux (RFC 5761)
            self._receive_rtcp(srtp, data, addr, elsewhere, now)
            return
        plain = srtp.unprotect_rtp(data)
        if plain is None or len(plain) < 12:
            self._unproven(elsewhere)
            return
        if elsewhere:
            self._follow(addr)
        self.rtp_in += 1
        seq, timestamp, ssrc = _RTP_FIELDS.unpack_from(plain, 2)
        self.rx.add(ssrc, seq, timestamp, now)
        app = self.app
        if app is None:
            self.pending_events.append(RtpReceived(plain))
            return
        for packet in app.on_rtp(plain, now):
            self.send_rtp(packet, now)

    def _receive_rtcp(
        self, srtp: SrtpContext, data: bytes, addr: Addr, elsewhere: bool, now: float
    ) -> None:
        plain = srtp.unprotect_rtcp(data)
        if plain is None:
            self._unproven(elsewhere)
            return
        if elsewhere:
            self._follow(addr)
        self.rtcp_in += 1
        self._on_rtcp(plain, now)

    def _unproven(self, elsewhere: bool) -> None:
        """Media that did not unprotect: from elsewhere it proved nothing (wrong address)."""
        if elsewhere:
            self.dropped_wrong_address += 1
        else:
            self.srtp_errors += 1

    def _on_rtcp(self, plain: bytes, now: float) -> None:
        try:
            packets = parse_rtcp(plain)
        except RtpError:
            self.rtcp_errors += 1
            return
        for packet in packets:
            if packet.packet_type == RTCP_SR:
                self.rx.on_sender_report(packet.ntp, now)
            if packet.packet_type in (RTCP_SR, RTCP_RR):
                for block in packet.reports:
                    if block.ssrc == self.ssrc and block.lsr:
                        rtt = (
                            ntp_middle(ntp_from_seconds(now)) - block.lsr - block.dlsr
                        ) & 0xFFFFFFFF
                        if rtt < 0x80000000:
                            self.rtt = rtt / 65536

    # Outputs ----------------------------------------------------------------------------------
    def send_rtp(self, packet: bytes, now: float) -> None:
        """Encrypt and send one plain RTP packet to the peer (dropped before DTLS is up)."""
        srtp, to = self.srtp, self._media_to
        if srtp is None or to is None:  # not secure yet, or closed
            return
        protected = srtp.protect_rtp(packet)  # refuses packets shorter than an RTP header
        self._sent_octets += len(packet) - 12
        self._last_sent_rtp = packet
        self.rtp_out += 1
        self.packets_out += 1
        self.bytes_out += len(protected)
        self._out.append((protected, to))

    def _send(self, data: bytes, addr: Addr) -> None:
        self.packets_out += 1
        self.bytes_out += len(data)
        self._out.append((data, addr))

    def _send_dtls(self) -> None:
        """Queue what the DTLS endpoint wrote, to the media address (dropped before ICE)."""
        target = self._media_to
        for datagram in self.dtls.datagrams_to_send():
            if target is not None:
                self._send(datagram, target)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self.pending_events = self.pending_events, []
        return out

    # Timers -----------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        if self.state == CLOSED:
            return None
        candidates = [self.ice.next_timer()]
        app_timer = self.app.next_timer() if self.app is not None and self.srtp else None
        for t in (self.dtls.next_timer(), self._next_rtcp, app_timer, self._connect_deadline):
            if t is not None:
                candidates.append(t)
        return min(candidates)

    def handle_timer(self, now: float) -> None:
        if self.state == CLOSED:
            return
        if self._connect_deadline is not None and now >= self._connect_deadline:
            self.close(now, "never-connected")
            return
        if self.ice.expired(now):
            self.close(now, "consent-expired" if self.ice.selected else "never-connected")
            return
        self._ice_timer(now)
        before = self.dtls.state
        self.dtls.handle_timer(now)
        self._send_dtls()
        self._after_dtls(before, now)
        if self.state != SECURE:
            return
        if self.app is not None:
            for packet in self.app.handle_timer(now):
                self.send_rtp(packet, now)
        if self._next_rtcp is not None and now >= self._next_rtcp:
            self._next_rtcp = now + self.config.rtcp_interval
            self._send_rtcp(now)

    def _ice_timer(self, now: float) -> None:
        """Run the ICE agent's timer and send its checks (a controlling agent's only output)."""
        self.ice.handle_timer(now)
        checks = self.ice.datagrams_to_send()
        for check, addr in checks:
            self._send(check, addr)
        if checks:
            self._move(CHECKS_SENT)

    def _send_rtcp(self, now: float) -> None:
        to = self._media_to
        if self.srtp is None or to is None:
            return
        blocks = [self.rx.report_block(now)] if self.rx.received else []
        if self.rtp_out:
            report = build_sender_report(
                self.ssrc,
                ntp_from_seconds(now),
                _RTP_FIELDS.unpack_from(self._last_sent_rtp, 2)[1],
                self.rtp_out,
                self._sent_octets,
                blocks,
            )
        else:
            report = build_receiver_report(self.ssrc, blocks)
        self.rtcp_out += 1
        self._send(self.srtp.protect_rtcp(report), to)

    # Closing ----------------------------------------------------------------------------------
    def close(self, now: float, reason: str = "closed") -> None:
        """End the call: close_notify to the peer (if DTLS is still up), a SessionClosed event."""
        if self.state == CLOSED:
            return
        if self.dtls.state not in (dtls.CLOSED, dtls.FAILED):
            self.dtls.close()
            self._send_dtls()
        self._move(CLOSE)
        self._set_media_to(None)
        self.close_reason = reason
        self.pending_events.append(SessionClosed(reason))

    @property
    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            **{f"ice_{k}": v for k, v in self.ice.counters.items()},
            "state": self.state,
            "srtp_profile": self.srtp.profile if self.srtp else None,
            "rtt": self.rtt,
            "received": self.rx.received,
            "lost": self.rx.lost,
            "jitter": self.rx.jitter / self.rx.clock_rate,
            "remote": self.ice.selected,
            "close_reason": self.close_reason,
        }


def _ice_agent(
    role: str,
    local_ufrag: str,
    local_pwd: str,
    remote_ufrag: str,
    remote_pwd: str,
    remote_addr: Addr | None,
    cfg: SessionConfig,
    now: float,
) -> IceAgent:
    """The ICE agent of an ICE role: "lite" answers checks, "controlling" sends them and
    answers the peer's."""
    if role == "lite":
        return IceLite(local_ufrag, local_pwd, remote_ufrag, cfg.consent_timeout, now)
    if role != "controlling":
        raise ValueError(f"ice_role must be lite or controlling, not {role!r}")
    if remote_addr is None:
        raise ValueError("a controlling session needs remote_addr")
    return IceController(
        local_ufrag,
        remote_ufrag,
        remote_pwd,
        remote_addr,
        local_pwd=local_pwd,
        check_interval=cfg.check_interval,
        consent_interval=cfg.consent_interval,
        consent_timeout=cfg.consent_timeout,
        now=now,
    )
