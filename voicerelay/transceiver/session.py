"""One call, sans-IO: ICE + DTLS + SRTP + RTCP + a voice app, driven by datagrams and a clock.

    session.receive(datagram, addr, now)      # whatever arrived for this call
    session.datagrams_to_send()               # [(datagram, addr)] to put on the wire
    session.next_timer() / handle_timer(now)  # retransmission, consent, RTCP
    session.events()                          # IceConnected, AddressChanged, DtlsConnected,
                                              # RtpReceived, SessionClosed

Role "lite" is the server (answers checks, hands audio to the app); role "controlling" is a
client (sends checks and media with `send_rtp`). No sockets, threads or clock reads here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from voicerelay.transceiver.apps import VoiceApp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.dtls import DEFAULT_PROFILES, DtlsEndpoint
from voicerelay.transceiver.ice import IceController, IceLite
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
from voicerelay.transceiver.srtp import SrtpContext
from voicerelay.wire.addr import Addr

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
)


@dataclass
class SessionConfig:
    consent_timeout: float = 30.0
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
class DtlsConnected:
    profile: str


@dataclass
class RtpReceived:
    packet: bytes


@dataclass
class SessionClosed:
    reason: str


Event = IceConnected | AddressChanged | DtlsConnected | RtpReceived | SessionClosed


class Session:
    """The whole state of one call.

    Media (SRTP/SRTCP in, `send_rtp` out) changes no state and, with an app whose
    `moves_timer` is False (echo), moves no timer and raises no event: the server's hot path
    relies on that and after such media only sends (see `TransceiverServer.datagram_received`).
    The app's own timer (a decoded-audio app paces its output on it) is part of `next_timer`.
    Counters are plain attributes (named in `COUNTER_NAMES`); `counters` reads them as a dict.
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
        self.ice: IceLite | IceController
        if ice_role == "lite":
            self.ice = IceLite(local_ufrag, local_pwd, remote_ufrag, cfg.consent_timeout, now)
        elif ice_role == "controlling":
            if remote_addr is None:
                raise ValueError("a controlling session needs remote_addr")
            self.ice = IceController(
                local_ufrag,
                remote_ufrag,
                remote_pwd,
                remote_addr,
                check_interval=cfg.check_interval,
                consent_interval=cfg.consent_interval,
                consent_timeout=cfg.consent_timeout,
                now=now,
            )
        else:
            raise ValueError(f"ice_role must be lite or controlling, not {ice_role!r}")
        self.dtls = DtlsEndpoint(
            dtls_role, certificate, remote_fingerprint, mtu=cfg.mtu, profiles=cfg.srtp_profiles
        )
        self.app = app
        self.ssrc = ssrc if ssrc is not None else int.from_bytes(os.urandom(4), "big")
        self.srtp: SrtpContext | None = None
        self.state = "new"
        self.close_reason: str | None = None
        self.rx = ReceiveStats()
        self.rtt: float | None = None
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list[Event] = []
        self._next_rtcp: float | None = None
        self._media_to: Addr | None = None  # the selected address while the call is open
        self._sent_octets = 0  # RTP payload octets for sender reports (packets: rtp_out)
        self._last_sent_rtp = b""  # its timestamp goes into sender reports
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.rtp_in = self.rtp_out = self.rtcp_in = self.rtcp_out = 0
        self.dropped_before_secure = self.dropped_unknown = self.dropped_wrong_address = 0
        self.srtp_errors = self.rtcp_errors = 0
        if ice_role == "controlling":
            self.state = "checking"
            self._poll_checks(now)

    # Inputs -----------------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of this session's counters by name."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed one datagram that arrived for this call. Never raises on bad input."""
        if self.state == "closed":
            return
        self.packets_in += 1
        self.bytes_in += len(data)
        first = data[0] if data else 255  # RFC 7983 demultiplexing, media first
        if 127 < first < 192:
            self._receive_media(data, addr, now)
        elif first < 4:
            self._receive_stun(data, addr, now)
        elif 19 < first < 64:
            self._receive_dtls(data, addr, now)
        else:
            self.dropped_unknown += 1

    def _receive_stun(self, data: bytes, addr: Addr, now: float) -> None:
        was_connected = self.ice.selected is not None
        if isinstance(self.ice, IceLite):
            response = self.ice.handle(data, addr, now)
            if response is not None:
                self._out.append((response, addr))
        else:
            self.ice.handle(data, addr, now)
        self._set_media_to(self.ice.selected)
        if not was_connected and self.ice.selected is not None:
            self._on_ice_connected(now)

    def _set_media_to(self, addr: Addr | None) -> None:
        if addr != self._media_to:
            self._media_to = addr
            self._events.append(AddressChanged(addr))

    def _on_ice_connected(self, now: float) -> None:
        assert self.ice.selected is not None
        if self.state in ("new", "checking"):
            self.state = "connected"
        self._events.append(IceConnected(self.ice.selected))
        if self.dtls.role == "client":
            self.dtls.start(now)
            self._flush_dtls()

    def _receive_dtls(self, data: bytes, addr: Addr, now: float) -> None:
        if self.ice.selected is None:
            self.dropped_before_secure += 1
            return
        before = self.dtls.state
        self.dtls.receive(data, now)
        self._flush_dtls()
        self._after_dtls(before, now)

    def _after_dtls(self, before: str, now: float) -> None:
        state = self.dtls.state
        if state == before:
            return
        if state == "connected" and self.dtls.srtp_keys is not None:
            self.srtp = SrtpContext(self.dtls.srtp_keys)
            self.state = "secure"
            self._next_rtcp = now + min(self.config.rtcp_first, self.config.rtcp_interval)
            self._events.append(DtlsConnected(self.dtls.srtp_keys.profile))
        elif state == "failed":
            self._finish(now, self.dtls.error or "dtls-failed")
        elif state == "closed":
            self._finish(now, "peer-closed")

    def _receive_media(self, data: bytes, addr: Addr, now: float) -> None:
        srtp = self.srtp
        if srtp is None:
            self.dropped_before_secure += 1
            return
        if addr != self._media_to:
            self.dropped_wrong_address += 1
            return
        if len(data) > 1 and 191 < data[1] < 224:  # RTCP under rtcp-mux (RFC 5761)
            self._receive_rtcp(srtp, data, now)
            return
        plain = srtp.unprotect_rtp(data)
        if plain is None or len(plain) < 12:
            self.srtp_errors += 1
            return
        self.rtp_in += 1
        seq, timestamp, ssrc = _RTP_FIELDS.unpack_from(plain, 2)
        self.rx.add(ssrc, seq, timestamp, now)
        app = self.app
        if app is None:
            self._events.append(RtpReceived(plain))
            return
        for packet in app.on_rtp(plain, now):
            self.send_rtp(packet, now)

    def _receive_rtcp(self, srtp: SrtpContext, data: bytes, now: float) -> None:
        plain = srtp.unprotect_rtcp(data)
        if plain is None:
            self.srtp_errors += 1
            return
        self.rtcp_in += 1
        self._on_rtcp(plain, now)

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

    def _flush_dtls(self) -> None:
        target = self.ice.selected
        for datagram in self.dtls.datagrams_to_send():
            if target is not None:
                self._send(datagram, target)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    # Timers -----------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        if self.state == "closed":
            return None
        candidates = [
            self.ice.consent_deadline() if isinstance(self.ice, IceLite) else self.ice.next_timer()
        ]
        app_timer = self.app.next_timer() if self.app is not None and self.srtp else None
        for t in (self.dtls.next_timer(), self._next_rtcp, app_timer):
            if t is not None:
                candidates.append(t)
        return min(candidates)

    def handle_timer(self, now: float) -> None:
        if self.state == "closed":
            return
        if self.ice.expired(now):
            self.close(now, "consent-expired")
            return
        if isinstance(self.ice, IceController):
            self._poll_checks(now)
        before = self.dtls.state
        self.dtls.handle_timer(now)
        self._flush_dtls()
        self._after_dtls(before, now)
        if self.state != "secure":
            return
        if self.app is not None:
            for packet in self.app.handle_timer(now):
                self.send_rtp(packet, now)
        if self._next_rtcp is not None and now >= self._next_rtcp:
            self._next_rtcp = now + self.config.rtcp_interval
            self._send_rtcp(now)

    def _poll_checks(self, now: float) -> None:
        assert isinstance(self.ice, IceController)
        for request in self.ice.poll(now):
            self._send(request, self.ice.remote)

    def _send_rtcp(self, now: float) -> None:
        if self.srtp is None or self.ice.selected is None:
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
        self._send(self.srtp.protect_rtcp(report), self.ice.selected)

    # Closing ----------------------------------------------------------------------------------
    def close(self, now: float, reason: str = "closed") -> None:
        """End the call: close_notify to the peer, a SessionClosed event."""
        if self.state == "closed":
            return
        self.dtls.close()
        self._flush_dtls()
        self._finish(now, reason)

    def _finish(self, now: float, reason: str) -> None:
        if self.state == "closed":
            return
        if self.dtls.state not in ("closed", "failed"):
            self.dtls.close()
            self._flush_dtls()
        self.state = "closed"
        self._set_media_to(None)
        self.close_reason = reason
        self._events.append(SessionClosed(reason))

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
