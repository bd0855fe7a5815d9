"""A lightweight WebRTC audio client on the project's own `Session` (client role).

Each `ClientCall` owns one UDP socket (the relay keys flows by client address), posts an offer
to WHIP signaling, connects through the relay, and sends/receives RTP. Cheap enough to run
hundreds of calls from one process, which aiortc is not: the load client of bench/ and the
protocol-level tests use it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass

import aiohttp

from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.rtp import RtpPacket
from voicerelay.transceiver.session import (
    DtlsConnected,
    RtpReceived,
    Session,
    SessionClosed,
    SessionConfig,
)
from voicerelay.wire.addr import Addr


@dataclass
class CallOptions:
    certificate: Certificate | None = None
    advertised_fingerprint: str | None = None  # lie in the offer (tests of fingerprint checks)
    config: SessionConfig | None = None


class ClientCall(asyncio.DatagramProtocol):
    """One call: its socket, its Session, and what came back."""

    def __init__(self, certificate: Certificate, clock=time.monotonic) -> None:
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
        self.secure_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._seq = 0
        self.ssrc = int.from_bytes(os.urandom(4), "big")

    # Setup ----------------------------------------------------------------------------------
    async def connect(
        self, http: aiohttp.ClientSession, url: str, options: CallOptions | None = None
    ) -> None:
        """POST the offer, apply the answer, open the socket and start ICE towards the relay."""
        options = options or CallOptions()
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
        async with http.post(
            url.rstrip("/") + "/v1/sessions",
            data=offer,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"signaling answered {resp.status}: {body.strip()}")
            self.location = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
        answer = sdp.parse_answer(body)
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
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
        self._pump()

    @property
    def local_addr(self) -> Addr:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    # asyncio --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if self.session is not None:
            self.session.receive(data, addr[:2], self.clock())
            self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None and not self.timers_paused:
            self.session.handle_timer(self.clock())
            self._pump()

    def _pump(self) -> None:
        session = self.session
        assert session is not None
        if self.transport is not None:
            for data, addr in session.datagrams_to_send():
                self.transport.sendto(data, addr)
        now = self.clock()
        for event in session.events():
            if isinstance(event, DtlsConnected) and not self.secure.done():
                self.secure_at = now
                self.secure.set_result(event.profile)
            elif isinstance(event, RtpReceived):
                self.received.append((now, event.packet))
            elif isinstance(event, SessionClosed) and not self.closed.done():
                self.closed.set_result(event.reason)
                if not self.secure.done():
                    self.secure.set_exception(ConnectionError(event.reason))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = session.next_timer()
        if when is not None and not self.timers_paused:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - now), self._on_timer)

    # Use ------------------------------------------------------------------------------------
    def send_audio(self, payload: bytes, timestamp: int) -> None:
        """Send one Opus-sized RTP packet (payload type 111)."""
        assert self.session is not None
        self._seq = (self._seq + 1) & 0xFFFF
        self.session.send_rtp(
            RtpPacket(111, self._seq, timestamp, self.ssrc, payload).serialize(), self.clock()
        )
        self._pump()

    def pause_timers(self) -> None:
        """Go silent: no more consent checks or RTCP (what a vanished browser looks like)."""
        self.timers_paused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def hang_up(self, http: aiohttp.ClientSession) -> int:
        """DELETE the session at the signaling server; returns the HTTP status."""
        assert self.location is not None
        async with http.delete(self.location) as resp:
            return resp.status

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.session is not None and self.session.state != "closed":
            self.session.close(self.clock(), "client-closed")
            self._pump()
        if self.transport is not None:
            self.transport.close()
