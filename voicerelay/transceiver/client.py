"""A lightweight WebRTC audio client on the project's own `Session` (client role).

Each `ClientCall` owns one UDP socket (the relay keys flows by client address), posts an offer
to WHIP signaling, connects through the relay, and sends/receives RTP. Cheap enough to run
hundreds of calls from one process, which aiortc is not: the load client of bench/ and the
protocol-level tests use it.

`CallOptions(direct=<transceiver internal address>)` skips the relay: the call wraps its
datagrams in the relay envelope itself and talks to the transceiver's internal port, the
zero-hop baseline the benchmarks compare the relay against.

The call is a full ICE agent (its `Session` answers the peer's connectivity checks), so it
also talks to full-ICE servers (aiortc, Janus); `exchange` is its signaling (WHIP-style POST),
which a subclass replaces to speak another server's.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.session import (
    CLOSED,
    SECURE,
    DtlsConnected,
    IceConnected,
    RtpReceived,
    Session,
    SessionClosed,
    SessionConfig,
)
from voicerelay.wire import envelope
from voicerelay.wire.addr import Addr
from voicerelay.wire.demux import IS_RTP

OPUS_PT = 111
_RTP_HEADER = struct.Struct("!BBHII")  # v=2, payload type, sequence, timestamp, ssrc


@dataclass
class CallOptions:
    certificate: Certificate | None = None
    advertised_fingerprint: str | None = None  # lie in the offer (tests of fingerprint checks)
    config: SessionConfig | None = None
    direct: Addr | None = None  # transceiver internal address: send envelopes there, no relay
    keep_packets: bool = True  # False: only count echoed RTP (load clients), keep no payloads
    local_host: str = "127.0.0.1"  # the address the call's socket binds


class ClientCall(asyncio.DatagramProtocol):
    """One call: its socket, its Session, and what came back."""

    def __init__(
        self, certificate: Certificate, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.certificate = certificate
        self.clock = clock
        self.session: Session | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.location: str | None = None
        self.received: list[tuple[float, bytes]] = []
        self.secure = asyncio.get_event_loop().create_future()
        self.closed = asyncio.get_event_loop().create_future()
        self.timers_paused = False
        self.posted_at = 0.0
        self.answered_at: float | None = None  # signaling answered (201)
        self.ice_connected_at: float | None = None
        self.secure_at: float | None = None
        self.first_rtp_at: float | None = None  # first RTP packet back from the server
        self.rtp_received = 0
        self.keep_packets = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._seq = 0
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self._direct: Addr | None = None
        self._remote: Addr | None = None
        self._header = b""

    # Setup ----------------------------------------------------------------------------------
    async def connect(
        self, http: aiohttp.ClientSession, url: str, options: CallOptions | None = None
    ) -> None:
        """Send the offer (`exchange`), apply the answer, open the socket and start ICE towards
        the answer's first candidate: the relay (or, with `options.direct`, straight to the
        transceiver's internal port)."""
        options = options or CallOptions()
        self.keep_packets = options.keep_packets
        loop = asyncio.get_running_loop()
        ufrag = base64.b64encode(os.urandom(6)).decode()
        pwd = base64.b64encode(os.urandom(18)).decode()
        offer = sdp.build_offer(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprint=options.advertised_fingerprint or self.certificate.fingerprint,
            ssrc=self.ssrc,
            cname="voicerelay-client",
        )
        self.posted_at = self.clock()
        body = await self.exchange(http, url, offer)
        self.answered_at = self.clock()
        answer = sdp.parse_answer(body)
        await loop.create_datagram_endpoint(lambda: self, local_addr=(options.local_host, 0))
        self._remote = answer.candidate
        if options.direct is not None:
            self._direct = options.direct
            self._header = envelope.pack_header(self.local_addr)
        self.session = Session(
            ice_role="controlling",
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote_ufrag=answer.ice_ufrag,
            remote_pwd=answer.ice_pwd,
            dtls_role="client" if answer.setup == "passive" else "server",
            certificate=self.certificate,
            remote_fingerprint=answer.fingerprint,
            now=self.clock(),
            config=options.config,
            remote_addr=answer.candidate,
            ssrc=self.ssrc,
        )
        self._after_input()

    async def exchange(self, http: aiohttp.ClientSession, url: str, offer: str) -> str:
        """Signaling: POST the offer to `<url>/v1/sessions`, return the answer's SDP and keep
        its `Location` (what `hang_up` deletes). Raises RuntimeError unless answered 201."""
        async with http.post(
            url.rstrip("/") + "/v1/sessions",
            data=offer,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"signaling answered {resp.status}: {body.strip()}")
            self.location = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
        return body

    async def rebind(self, sock: socket.socket | None = None) -> None:
        """Go on from a new local port (or the bound UDP `sock`), as after a NAT rebinding: the
        old socket closes, and the session's next check and media leave from the new one
        (nothing is re-negotiated)."""
        old = self.transport
        assert old is not None
        loop = asyncio.get_running_loop()
        if sock is None:
            host = old.get_extra_info("sockname")[0]
            await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        else:
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        old.close()  # connection_made already holds the new transport
        if self._direct is not None:
            self._header = envelope.pack_header(self.local_addr)

    @property
    def local_addr(self) -> Addr:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    # asyncio --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if self.session is None:
            return
        if self._direct is not None:
            if data[: envelope.HEADER_SIZE] == self._header:  # replies carry our own header
                data = data[envelope.HEADER_SIZE :]
            else:
                try:
                    _, data = envelope.unpack(data)
                except envelope.EnvelopeError:
                    return
            addr = self._remote  # type: ignore[assignment]  # as if the relay had sent it
        now = self.clock()
        self.session.receive(data, addr[:2], now)
        if data and IS_RTP[data[0]] and self.session.state == SECURE:
            self._take_media(now)  # SRTP/SRTCP in: nothing to send, no timer moves
        else:
            self._after_input()

    def _take_media(self, now: float) -> None:
        for event in self.session.events():  # type: ignore[union-attr]
            if isinstance(event, RtpReceived):
                self._on_rtp(event.packet, now)

    def _on_rtp(self, packet: bytes, now: float) -> None:
        self.rtp_received += 1
        if self.first_rtp_at is None:
            self.first_rtp_at = now
        if self.keep_packets:
            self.received.append((now, packet))

    def _on_timer(self) -> None:
        when, self._timer, self._timer_when = self._timer_when, None, None
        if self.session is not None and not self.timers_paused:
            # libuv fires timers up to a millisecond early: the deadline has come all the same
            self.session.handle_timer(max(self.clock(), when or 0.0))
            self._after_input()

    def _transmit(self) -> None:
        """Put what the session queued on the wire (enveloped when direct)."""
        transport = self.transport
        if transport is None:
            return
        out = self.session.datagrams_to_send()  # type: ignore[union-attr]
        if self._direct is None:
            for data, addr in out:
                transport.sendto(data, addr)
        else:
            for data, _ in out:
                transport.sendto(self._header + data, self._direct)

    def _after_input(self) -> None:
        """After any input (a datagram, the timer, setup, close): transmit, act on the
        session's events, re-arm its timer."""
        session = self.session
        assert session is not None
        self._transmit()
        now = self.clock()
        for event in session.events():
            if isinstance(event, RtpReceived):
                self._on_rtp(event.packet, now)
            elif isinstance(event, IceConnected):
                self.ice_connected_at = self.ice_connected_at or now
            elif isinstance(event, DtlsConnected) and not self.secure.done():
                self.secure_at = now
                self.secure.set_result(event.profile)
            elif isinstance(event, SessionClosed) and not self.closed.done():
                self.closed.set_result(event.reason)
                if not self.secure.done():
                    self.secure.set_exception(ConnectionError(event.reason))
        self._rearm(session, now)

    def _rearm(self, session: Session, now: float) -> None:
        """Keep one timer at the session's next deadline (re-armed only when it moves)."""
        when = None if self.timers_paused else session.next_timer()
        if when == self._timer_when and (when is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - now), self._on_timer)

    # Use ------------------------------------------------------------------------------------
    def send_audio(self, payload: bytes, timestamp: int) -> None:
        """Send one Opus-sized RTP packet (payload type 111); dropped until the call is secure."""
        session = self.session
        assert session is not None
        self._seq = seq = (self._seq + 1) & 0xFFFF
        packet = _RTP_HEADER.pack(0x80, OPUS_PT, seq, timestamp & 0xFFFFFFFF, self.ssrc)
        session.send_rtp(packet + payload, self.clock())
        self._transmit()  # sending RTP raises no events and moves no timer

    @property
    def rtp_sent(self) -> int:
        """RTP packets actually sent (encrypted; none before the call is secure)."""
        return self.session.counters["rtp_out"] if self.session is not None else 0

    def pause_timers(self) -> None:
        """Go silent: no more consent checks or RTCP (what a vanished browser looks like)."""
        self.timers_paused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = None

    async def hang_up(self, http: aiohttp.ClientSession) -> int:
        """DELETE the session at the signaling server; returns the HTTP status."""
        assert self.location is not None
        async with http.delete(self.location) as resp:
            return resp.status

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None and self.session.state != CLOSED:
            self.session.close(self.clock(), "client-closed")
            self._after_input()  # close_notify out; a closed session arms no timer
        if self.transport is not None:
            self.transport.close()
