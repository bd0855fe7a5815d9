"""A minimal Realtime-subset backend for the benchmarks: it says back what it heard.

At each `input_audio_buffer.commit` + `response.create` it streams the audio committed since
its last reply back as the reply (`--reply echo`), or a fixed tone (`--reply tone`), in 100 ms
`response.output_audio.delta`s sent as fast as the socket takes them. No ASR, no TTS, next to
no CPU: a benchmark behind it measures the transceiver, not the backend.

It speaks the subset of docs/REALTIME.md the bridge uses, with the reference agent's answers:
`session.created` on connect; `session.update` -> `session.updated`; `commit` ->
`input_audio_buffer.committed` (empty buffer: `error` `commit-empty`); `clear` -> `cleared`;
`response.create` -> created, output item, audio deltas, audio done, `response.done completed`;
`response.cancel` -> `error` `no-active-response` (a reply is always sent whole at once);
`conversation.item.truncate` of one of its replies -> `conversation.item.truncated` (else
`error` `unknown-item`); a malformed event -> `error` whose code is the ProtocolError reason.

    .venv/bin/python bench/echo_backend.py [--listen 127.0.0.1:8765] [--reply echo|tone]

prints `echo backend ready: ws://HOST:PORT/v1/realtime` on stderr; `GET /v1/stats` counts what
it did (JSON), `GET /healthz` answers `{"status": "ok"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import harness  # noqa: F401 - puts the repository root on sys.path
import numpy as np
from aiohttp import WSMsgType, web

from voicerelay.voice import realtime

RATE = realtime.REALTIME_RATE
MAX_BUFFERED_S = 60.0  # input audio held before `buffer-overflow`, as the reference agent
KEEP_ITEMS = 256  # reply item ids remembered for truncation
REPLY_MODES = ("echo", "tone")


def tone(seconds: float, freq: float = 500.0, rate: int = RATE) -> bytes:
    """A sine at 40 % of full scale: little-endian int16 mono PCM."""
    t = np.arange(round(seconds * rate)) / rate
    return (0.4 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


@dataclass(frozen=True)
class ReplyConfig:
    """What a reply says: the committed audio (`echo`) or `tone_s` of a 500 Hz tone."""

    mode: str = "echo"
    tone_s: float = 0.5
    chunk_ms: int = 100

    def __post_init__(self) -> None:
        if self.mode not in REPLY_MODES:
            raise ValueError(f"reply mode {self.mode!r} is unknown: use one of {REPLY_MODES}")
        if not 0 < self.tone_s <= 600 or not 10 <= self.chunk_ms <= 1000:
            raise ValueError("tone_s must be in (0, 600] s and chunk_ms in [10, 1000]")


class EchoConversation:
    """One connection's conversation, sans-IO: client event text in, server event texts out.
    `counters` may be shared by every conversation of a server."""

    def __init__(
        self, reply: ReplyConfig | None = None, counters: Counter[str] | None = None
    ) -> None:
        self.reply = reply or ReplyConfig()
        self._tone = tone(self.reply.tone_s) if self.reply.mode == "tone" else b""
        self._buffer = bytearray()  # appended, not committed yet
        self._unanswered: list[bytes] = []  # committed items no reply has said back yet
        self._replies: deque[str] = deque(maxlen=KEEP_ITEMS)  # reply item ids
        self.first_delta: int | None = None  # index of the reply's first delta in the last output
        self.counters: Counter[str] = Counter() if counters is None else counters

    def opened(self) -> list[str]:
        """What the server says first."""
        return [realtime.server_session_created()]

    def receive(self, text: str | bytes) -> list[str]:
        """One client event; the server events to send back, in order."""
        self.first_delta = None
        try:
            event = realtime.parse_client_event(text)
        except realtime.ProtocolError as exc:
            return self._error(str(exc), exc.reason)
        self.counters[f"in_{type(event).__name__}"] += 1
        if isinstance(event, realtime.SessionUpdate):
            if event.rate != RATE:
                return self._error(f"only {RATE} Hz PCM is served", "unsupported-rate")
            return [realtime.server_session_updated(rate=RATE)]
        if isinstance(event, realtime.InputAppend):
            return self._append(event.pcm)
        if isinstance(event, realtime.InputCommit):
            return self._commit()
        if isinstance(event, realtime.InputClear):
            self._buffer.clear()
            return [realtime.server_input_cleared()]
        if isinstance(event, realtime.ResponseCreate):
            return self._respond()
        if isinstance(event, realtime.ResponseCancel):
            return self._error("no response is in progress", "no-active-response")
        if isinstance(event, realtime.ItemTruncate):
            return self._truncate(event)
        return []  # Ignored: a well-formed event outside the subset

    def _append(self, pcm: bytes) -> list[str]:
        self._buffer += pcm
        if len(self._buffer) > MAX_BUFFERED_S * RATE * 2:
            self._buffer.clear()
            return self._error(f"over {MAX_BUFFERED_S:g} s of audio buffered", "buffer-overflow")
        return []

    def _commit(self) -> list[str]:
        if not self._buffer:
            return self._error("the input audio buffer is empty", "commit-empty")
        self._unanswered.append(bytes(self._buffer))
        self._buffer.clear()
        self.counters["commits"] += 1
        return [realtime.server_input_committed(realtime.new_id("item"))]

    def _respond(self) -> list[str]:
        """The whole reply at once: created, item, deltas, done."""
        pcm = self._tone if self.reply.mode == "tone" else b"".join(self._unanswered)
        self._unanswered.clear()
        response, item = realtime.new_id("resp"), realtime.new_id("item")
        self._replies.append(item)
        out = [
            realtime.server_response_created(response),
            realtime.server_output_item_added(response, item),
        ]
        step = RATE * 2 * self.reply.chunk_ms // 1000
        self.first_delta = len(out) if pcm else None
        out += [
            realtime.server_audio_delta(response, item, pcm[i : i + step])
            for i in range(0, len(pcm), step)
        ]
        out += [
            realtime.server_audio_done(response, item),
            realtime.server_response_done(response, "completed"),
        ]
        self.counters["responses"] += 1
        self.counters["reply_ms"] += len(pcm) * 1000 // (2 * RATE)
        return out

    def _truncate(self, event: realtime.ItemTruncate) -> list[str]:
        if event.item_id not in self._replies:
            return self._error(f"item {event.item_id!r} is not one of our replies", "unknown-item")
        self.counters["truncations"] += 1
        return [realtime.server_item_truncated(event.item_id, event.audio_end_ms)]

    def _error(self, message: str, code: str) -> list[str]:
        self.counters[f"error_{code}"] += 1
        return [realtime.server_error(message, code)]


Trace = Callable[[str, float], None]  # (what happened, time.monotonic()) for latency benches


class EchoBackend:
    """The aiohttp shell: one `EchoConversation` per WebSocket on `/v1/realtime`.

    `trace`, when given, is called for every reply with audio: ("response.create", when that
    event arrived) and ("first-delta", when the reply's first audio delta was handed to the
    socket)."""

    def __init__(self, reply: ReplyConfig | None = None, trace: Trace | None = None) -> None:
        self.reply = reply or ReplyConfig()
        self.trace = trace
        self.counters: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/realtime", self._realtime)
        app.router.add_get("/v1/stats", self._stats)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; returns the ws:// URL of the Realtime endpoint."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.url = f"ws://{bound[0]}:{bound[1]}/v1/realtime"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _realtime(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 << 20)
        await ws.prepare(request)
        conversation = EchoConversation(self.reply, self.counters)
        self.counters["connections"] += 1
        self.counters["open"] += 1
        try:
            await self._send_all(ws, conversation.opened())
            async for message in ws:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                arrived = time.monotonic()
                out = conversation.receive(message.data)
                first_delta = conversation.first_delta
                if self.trace is not None and first_delta is not None:
                    self.trace("response.create", arrived)
                await self._send_all(ws, out, first_delta)
        except ConnectionError:
            self.counters["connection_errors"] += 1
        finally:
            self.counters["open"] -= 1
        return ws

    async def _send_all(
        self, ws: web.WebSocketResponse, texts: list[str], first_delta: int | None = None
    ) -> None:
        for i, text in enumerate(texts):
            await ws.send_str(text)
            if i == first_delta and self.trace is not None:
                self.trace("first-delta", time.monotonic())

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.counters))

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


# Main -------------------------------------------------------------------------------------------
def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    return host, int(port)


async def serve(listen: tuple[str, int], reply: ReplyConfig) -> None:
    backend = EchoBackend(reply)
    url = await backend.start(*listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo backend ready: {url}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8765))
    parser.add_argument("--reply", choices=REPLY_MODES, default="echo")
    parser.add_argument("--tone-seconds", type=float, default=0.5, help="--reply tone: length")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per delta")
    args = parser.parse_args()
    try:
        reply = ReplyConfig(args.reply, args.tone_seconds, args.chunk_ms)
    except ValueError as exc:
        parser.error(str(exc))
    import uvloop

    uvloop.run(serve(args.listen, reply))


if __name__ == "__main__":
    main()
