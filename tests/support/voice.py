"""Voice test helpers: spoken audio from espeak-ng, a transceiver with an agent in this event
loop, a client call that speaks and hears real Opus, and scripted Realtime backends."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soxr
from aiohttp import web

from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.server import TransceiverServer
from voicerelay.transceiver.signaling import make_app
from voicerelay.voice import realtime
from voicerelay.voice.app import VoiceAgent
from voicerelay.voice.opus import OpusDecoder, OpusEncoder
from voicerelay.wire.token import TokenKeys

RATE = 48000
FRAME = 960


@cache
def speech(text: str, rate: int = RATE, wpm: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng, int16 mono at `rate`, without the silence espeak pads
    it with (so the array ends where the speaking ends)."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", str(wpm), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        source_rate = w.getframerate()
    pcm = soxr.resample(pcm, source_rate, rate).astype(np.int16)
    loud = np.flatnonzero(np.abs(pcm) > 0.02 * np.abs(pcm).max())
    return pcm[loud[0] : loud[-1] + 1]


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def tone_share(pcm: np.ndarray, freqs: tuple[float, ...], rate: int = RATE) -> float:
    """Share of the signal's energy within 30 Hz of any of `freqs`."""
    if pcm.size < 1024:
        return 0.0
    x = pcm.astype(np.float64)
    power = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(x.size))) ** 2
    total = power.sum()
    if total <= 0:
        return 0.0
    bins = np.fft.rfftfreq(x.size, 1 / rate)
    near = np.zeros(bins.size, dtype=bool)
    for f in freqs:
        near |= np.abs(bins - f) <= 30
    return float(power[near].sum() / total)


@dataclass
class AgentStack:
    """A TransceiverServer with a voice agent and its signaling, in this event loop."""

    server: TransceiverServer
    url: str
    runner: web.AppRunner

    @property
    def internal(self) -> tuple[str, int]:
        return self.server.internal_addr


@contextlib.asynccontextmanager
async def agent_stack(agent: VoiceAgent, tmp_path: Path) -> AsyncIterator[AgentStack]:
    config = TransceiverConfig(internal=("127.0.0.1", 0), http=("127.0.0.1", 0), state_dir=tmp_path)
    keys = TokenKeys({1: bytes(32)}, 1)
    server = TransceiverServer(config, keys, agent=agent)
    await server.start()
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield AgentStack(server, f"http://127.0.0.1:{port}", runner)
    finally:
        server.close()
        await runner.cleanup()


class Caller:
    """A real WebRTC call (the project's client-role Session) that speaks Opus in real time
    and decodes what comes back, straight to the transceiver's internal port."""

    def __init__(self, call: ClientCall, http: aiohttp.ClientSession) -> None:
        self.call = call
        self.http = http
        self.encoder = OpusEncoder(RATE)
        self.timestamp = 0
        self.sent_speech_at: list[float] = []  # when each frame with audio went out

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(cls, stack: AgentStack) -> AsyncIterator[Caller]:
        async with aiohttp.ClientSession() as http:
            call = ClientCall(Certificate.generate())
            await call.connect(http, stack.url, CallOptions(direct=stack.internal))
            try:
                await asyncio.wait_for(call.secure, 10)
                yield cls(call, http)
            finally:
                call.close()

    async def say(self, pcm: np.ndarray) -> None:
        """Send `pcm` (48 kHz) as 20 ms Opus packets, paced on the wall clock."""
        frames = -(-pcm.size // FRAME)
        padded = np.zeros(frames * FRAME, dtype=np.int16)
        padded[: pcm.size] = pcm
        start = time.monotonic()
        for i in range(frames):
            delay = start + i * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = padded[i * FRAME : (i + 1) * FRAME]
            if np.abs(frame).max() > 500:
                self.sent_speech_at.append(time.monotonic())
            self.call.send_audio(self.encoder.encode(frame), self.timestamp)
            self.timestamp += FRAME

    def heard(self, since: float = 0.0) -> list[tuple[float, np.ndarray]]:
        """(arrival, 20 ms of decoded audio) of every packet that came back after `since`."""
        decoder = OpusDecoder(RATE)
        packets = sorted(
            (int.from_bytes(p[2:4], "big"), at, p) for at, p in self.call.received if at >= since
        )
        return [(at, decoder.decode(p[12:])) for _, at, p in packets]

    def heard_pcm(self, since: float = 0.0) -> np.ndarray:
        frames = [pcm for _, pcm in self.heard(since)]
        return np.concatenate(frames) if frames else np.zeros(0, dtype=np.int16)

    async def wait_heard(self, seconds: float, timeout: float, since: float = 0.0) -> None:
        """Until `seconds` of audio came back after `since` (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while sum(1 for at, _ in self.call.received if at >= since) * 0.02 < seconds:
            if time.monotonic() > deadline:
                raise AssertionError(f"less than {seconds} s of audio came back in {timeout} s")
            await asyncio.sleep(0.02)

    async def wait_quiet(self, quiet: float, timeout: float) -> float:
        """Until nothing came back for `quiet` seconds; returns the last arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.call.received[-1][0] if self.call.received else 0.0
            if time.monotonic() - last >= quiet:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"audio kept coming for {timeout} s")
            await asyncio.sleep(0.02)


# Scripted Realtime backends ---------------------------------------------------------------------
Script = Callable[[web.WebSocketResponse, dict[str, Any], "ScriptedBackend"], Awaitable[None]]


@dataclass
class ScriptedBackend:
    """A real WebSocket server on loopback that answers the Realtime subset by a script:
    `on_response(ws, event, backend)` runs at each response.create. Records what it got."""

    on_response: Script
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    def types(self) -> list[str]:
        return [e.get("type", "?") for e in self.received]

    async def _handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        tasks: set[asyncio.Task] = set()
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            self.received.append(event)
            if event["type"] == "response.create":
                task = asyncio.ensure_future(self.on_response(ws, event, self))
                tasks.add(task)
        for task in tasks:
            task.cancel()
        return ws

    async def __aenter__(self) -> ScriptedBackend:
        app = web.Application()
        app.router.add_get("/v1/realtime", self._handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def tone24(freq: float, seconds: float) -> bytes:
    t = np.arange(int(seconds * realtime.REALTIME_RATE)) / realtime.REALTIME_RATE
    return (0.4 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


async def stream_reply(
    ws: web.WebSocketResponse,
    pcm: bytes,
    *,
    response_id: str = "resp_1",
    item_id: str = "item_1",
    chunk_ms: int = 100,
    pace: float = 0.0,
) -> None:
    """A well-formed response: created, audio deltas (`pace` seconds apart), done."""
    await ws.send_str(realtime.server_response_created(response_id))
    await ws.send_str(realtime.server_output_item_added(response_id, item_id))
    step = realtime.REALTIME_RATE * 2 * chunk_ms // 1000
    for i in range(0, len(pcm), step):
        await ws.send_str(realtime.server_audio_delta(response_id, item_id, pcm[i : i + step]))
        if pace:
            await asyncio.sleep(pace)
    await ws.send_str(realtime.server_audio_done(response_id, item_id))
    await ws.send_str(realtime.server_response_done(response_id, "completed"))


def unused_tcp_port() -> int:
    """A loopback TCP port nothing listens on (bound once, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
