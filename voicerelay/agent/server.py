"""The reference agent: the Realtime subset (docs/REALTIME.md) served over aiohttp WebSockets.

`AgentConversation` is the sans-IO core of one connection: client events in, server event
texts out, plus `Hear` requests for the shell to transcribe. `Connection` is the thin asyncio
shell: it runs speech recognition on the process's one ASR thread, speech synthesis through
the espeak-ng subprocess, and streams the reply in 100 ms audio deltas as fast as they are
ready (the transceiver paces playback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from voicerelay.agent.asr import Transcriber, to_asr_rate
from voicerelay.agent.tts import Speaker, TtsError
from voicerelay.voice import realtime as rt

log = logging.getLogger("voicerelay.agent")

PATH = "/v1/realtime"
MAX_BUFFER_SECONDS = 60.0  # uncommitted input audio; beyond it: error, buffer cleared
MAX_PENDING_ITEMS = 32  # committed user items not yet answered by a completed response
MAX_ASSISTANT_ITEMS = 32  # replies remembered for conversation.item.truncate
CHUNK_MS = 100  # audio per response.output_audio.delta
NOTHING_HEARD = "Sorry, I did not catch that."


def reply_text(transcripts: list[str]) -> str:
    """What the agent says back to the person's turns (in order)."""
    heard = " ".join(t.strip() for t in transcripts if t.strip()).rstrip(" .!?,;:")
    return f"You said: {heard}." if heard else NOTHING_HEARD


# Stats -----------------------------------------------------------------------------------------
@dataclass
class AgentStats:
    """Process-wide counters, served at GET /v1/stats."""

    connections: int = 0
    open_connections: int = 0
    committed: int = 0
    responses: int = 0  # completed
    cancelled: int = 0
    failed: int = 0
    truncations: int = 0
    truncated_audio_end_ms: deque[int] = field(default_factory=lambda: deque(maxlen=100))
    errors: Counter[str] = field(default_factory=Counter)
    asr_calls: int = 0
    asr_seconds: float = 0.0
    asr_audio_seconds: float = 0.0

    def error(self, reason: str) -> None:
        self.errors[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "open_connections": self.open_connections,
            "committed": self.committed,
            "responses": self.responses,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "truncations": self.truncations,
            "truncated_audio_end_ms": list(self.truncated_audio_end_ms),
            "errors": dict(self.errors),
            "asr_calls": self.asr_calls,
            "asr_seconds": round(self.asr_seconds, 3),
            "asr_audio_seconds": round(self.asr_audio_seconds, 3),
        }


# The sans-IO core ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hear:
    """Work for the shell: transcribe these user items (24 kHz PCM), then call `heard()`."""

    response_id: str
    items: tuple[tuple[str, bytes], ...]
    rate: int = rt.REALTIME_RATE


@dataclass
class _UserItem:
    item_id: str
    pcm: bytes
    transcript: str | None = None


@dataclass
class _Reply:
    response_id: str
    item_id: str  # the assistant item
    answers: tuple[str, ...]  # user item ids
    phase: str = "hearing"  # hearing -> speaking -> streaming -> finished
    created_sent: bool = False
    audio: bytes = b""
    sent: int = 0  # bytes of audio sent


class AgentConversation:
    """One connection's state: the input buffer, committed user items, the current reply.

    Drive it with `receive(text)` (or `feed(event)`), `heard()`, `spoken()`, `next_chunk()`;
    take the server events to send with `drain()`, in order.
    """

    def __init__(
        self,
        stats: AgentStats | None = None,
        *,
        max_buffer_seconds: float = MAX_BUFFER_SECONDS,
        chunk_ms: int = CHUNK_MS,
        max_event_bytes: int = rt.MAX_EVENT_BYTES,
    ) -> None:
        self.stats = stats if stats is not None else AgentStats()
        self.rate = rt.REALTIME_RATE
        self.max_buffer_bytes = int(max_buffer_seconds * self.rate) * 2
        self.chunk_bytes = self.rate * chunk_ms // 1000 * 2
        self.max_event_bytes = max_event_bytes
        self.buffer = bytearray()
        self.pending: dict[str, _UserItem] = {}  # committed, not answered by a completed reply
        self.last_item_id: str | None = None
        self.reply: _Reply | None = None  # the active reply (None once finished or cancelled)
        self.assistant_ms: dict[str, int] = {}  # assistant item -> audio ms, for truncate
        self._outbox: list[str] = [rt.server_session_created()]

    # outputs
    def drain(self) -> list[str]:
        """Server events to send, oldest first (each returned once)."""
        out, self._outbox = self._outbox, []
        return out

    def _error(self, reason: str, message: str) -> None:
        self.stats.error(reason)
        self._outbox.append(rt.server_error(message, reason))

    # client events
    def receive(self, text: str | bytes) -> Hear | None:
        """One client event's text; malformed ones get an `error` event (counted)."""
        try:
            event = rt.parse_client_event(text, self.max_event_bytes)
        except rt.ProtocolError as exc:
            self._error(exc.reason, str(exc))
            return None
        return self.feed(event)

    def feed(self, event: rt.ClientEvent) -> Hear | None:
        """Apply one client event; a `Hear` means: start answering (transcribe, then heard())."""
        match event:
            case rt.SessionUpdate():
                self._session_update(event)
            case rt.InputAppend(pcm=pcm):
                self._append(pcm)
            case rt.InputCommit():
                self._commit()
            case rt.InputClear():
                self.buffer.clear()
                self._outbox.append(rt.server_input_cleared())
            case rt.ResponseCreate():
                return self._response_create()
            case rt.ResponseCancel(response_id=response_id):
                self._cancel(response_id)
            case rt.ItemTruncate():
                self._truncate(event)
            case rt.Ignored():
                pass
        return None

    def _session_update(self, event: rt.SessionUpdate) -> None:
        if event.rate != rt.REALTIME_RATE:
            self._error("unsupported-rate", f"only audio/pcm at {rt.REALTIME_RATE} Hz is served")
            return
        self._outbox.append(rt.server_session_updated(rate=self.rate))

    def _append(self, pcm: bytes) -> None:
        if len(self.buffer) + len(pcm) > self.max_buffer_bytes:
            self.buffer.clear()
            seconds = self.max_buffer_bytes / 2 / self.rate
            self._error("buffer-overflow", f"input audio over {seconds:.0f} s: buffer cleared")
            return
        self.buffer += pcm

    def _commit(self) -> None:
        if not self.buffer:
            self._error("commit-empty", "input audio buffer is empty: nothing to commit")
            return
        if len(self.pending) >= MAX_PENDING_ITEMS:
            self.buffer.clear()
            self._error("too-many-items", f"over {MAX_PENDING_ITEMS} unanswered items: dropped")
            return
        item = _UserItem(rt.new_id("item"), bytes(self.buffer))
        self.buffer.clear()
        self.pending[item.item_id] = item
        self._outbox.append(rt.server_input_committed(item.item_id, self.last_item_id))
        self.last_item_id = item.item_id
        self.stats.committed += 1

    def _response_create(self) -> Hear | None:
        if self.reply is not None:
            self._error("active-response", f"response {self.reply.response_id} is in progress")
            return None
        self.reply = _Reply(rt.new_id("resp"), rt.new_id("item"), tuple(self.pending))
        todo = tuple(
            (item.item_id, item.pcm) for item in self.pending.values() if item.transcript is None
        )
        return Hear(self.reply.response_id, todo, self.rate)

    def _cancel(self, response_id: str | None) -> None:
        reply = self.reply
        if reply is None or response_id not in (None, reply.response_id):
            name = f"response {response_id}" if response_id else "response"
            self._error("no-active-response", f"no active {name} to cancel")
            return
        if not reply.created_sent:
            self._outbox.append(rt.server_response_created(reply.response_id))
        self._outbox.append(rt.server_response_done(reply.response_id, "cancelled"))
        reply.phase = "finished"
        self.reply = None
        self.stats.cancelled += 1

    def _truncate(self, event: rt.ItemTruncate) -> None:
        if event.item_id not in self.assistant_ms:
            self._error("unknown-item", f"no assistant item {event.item_id} to truncate")
            return
        self.stats.truncations += 1
        self.stats.truncated_audio_end_ms.append(event.audio_end_ms)
        log.info(
            "truncate %s at %d ms of %d ms",
            event.item_id,
            event.audio_end_ms,
            self.assistant_ms[event.item_id],
        )
        self._outbox.append(
            rt.server_item_truncated(event.item_id, event.audio_end_ms, event.content_index)
        )

    # the shell reports progress
    def _live(self, response_id: str, phase: str) -> _Reply | None:
        reply = self.reply
        if reply is None or reply.response_id != response_id or reply.phase != phase:
            return None
        return reply

    def heard(self, response_id: str, transcripts: Mapping[str, str]) -> str | None:
        """ASR finished: announce the transcripts; the reply text to speak, or None if the
        response was cancelled meanwhile."""
        for item_id, text in transcripts.items():
            item = self.pending.get(item_id)
            if item is not None and item.transcript is None:
                item.transcript = text
                self._outbox.append(rt.server_input_transcript(item_id, text))
        reply = self._live(response_id, "hearing")
        if reply is None:
            return None
        text = reply_text(
            [self.pending[i].transcript or "" for i in reply.answers if i in self.pending]
        )
        reply.phase, reply.created_sent = "speaking", True
        rid, iid = reply.response_id, reply.item_id
        self._outbox += [
            rt.server_response_created(rid),
            rt.server_output_item_added(rid, iid),
            rt.server_transcript_delta(rid, iid, text),
            rt.server_transcript_done(rid, iid, text),
        ]
        return text

    def spoken(self, response_id: str, pcm: bytes) -> bool:
        """TTS finished with this audio (int16 at 24 kHz); False if cancelled meanwhile."""
        reply = self._live(response_id, "speaking")
        if reply is None:
            return False
        reply.audio, reply.phase = pcm[: len(pcm) // 2 * 2], "streaming"
        self.assistant_ms[reply.item_id] = len(reply.audio) * 1000 // (2 * self.rate)
        while len(self.assistant_ms) > MAX_ASSISTANT_ITEMS:
            del self.assistant_ms[next(iter(self.assistant_ms))]
        return True

    def next_chunk(self, response_id: str) -> bool:
        """Queue the next audio delta (True), or the closing events once all is sent (False).
        False at once if the response is no longer streaming (cancelled)."""
        reply = self._live(response_id, "streaming")
        if reply is None:
            return False
        if reply.sent < len(reply.audio):
            chunk = reply.audio[reply.sent : reply.sent + self.chunk_bytes]
            reply.sent += len(chunk)
            self._outbox.append(rt.server_audio_delta(reply.response_id, reply.item_id, chunk))
            return True
        self._outbox += [
            rt.server_audio_done(reply.response_id, reply.item_id),
            rt.server_response_done(reply.response_id, "completed"),
        ]
        for item_id in reply.answers:
            self.pending.pop(item_id, None)
        reply.phase, self.reply = "finished", None
        self.stats.responses += 1
        return False

    def sent_seconds(self, response_id: str) -> float:
        """Seconds of reply audio queued so far (for an optional pace in the shell)."""
        reply = self.reply
        if reply is None or reply.response_id != response_id:
            return 0.0
        return reply.sent / 2 / self.rate

    def fail(self, response_id: str, reason: str, message: str) -> None:
        """ASR or TTS failed: an error event and response.done failed (items stay pending)."""
        reply = self.reply
        if reply is None or reply.response_id != response_id:
            return
        self._error(reason, message)
        if not reply.created_sent:
            self._outbox.append(rt.server_response_created(reply.response_id))
        self._outbox.append(rt.server_response_done(reply.response_id, "failed"))
        reply.phase, self.reply = "finished", None
        self.stats.failed += 1


# The asyncio shell -----------------------------------------------------------------------------
@dataclass
class AgentContext:
    """What every connection of one agent process shares."""

    transcriber: Transcriber
    speaker: Speaker
    executor: ThreadPoolExecutor
    key: str | None = None
    pace: float | None = None  # None: deltas as fast as ready; else at most pace x real time
    stats: AgentStats = field(default_factory=AgentStats)


def transcribe_items(
    transcriber: Transcriber, items: tuple[tuple[str, bytes], ...], rate: int
) -> tuple[dict[str, str], float, float]:
    """Runs on the ASR thread: {item_id: text}, ASR wall seconds, audio seconds."""
    started = time.monotonic()
    texts, audio_seconds = {}, 0.0
    for item_id, pcm in items:
        samples = np.frombuffer(pcm, dtype="<i2")
        audio_seconds += samples.size / rate
        texts[item_id] = transcriber.transcribe(to_asr_rate(samples, rate))
    return texts, time.monotonic() - started, audio_seconds


class Connection:
    """Runs one WebSocket: reads client events, answers, streams replies."""

    def __init__(self, ws: web.WebSocketResponse, ctx: AgentContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.conv = AgentConversation(ctx.stats)
        self.send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    async def flush(self) -> None:
        """Send everything the core queued, in order (one sender at a time)."""
        async with self.send_lock:
            for text in self.conv.drain():
                if self.ws.closed:
                    return
                await self.ws.send_str(text)

    async def run(self) -> None:
        try:
            await self.flush()
            async for msg in self.ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                hear = self.conv.receive(msg.data)
                await self.flush()
                if hear is not None:
                    task = asyncio.create_task(self.respond(hear))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        except ConnectionError as exc:  # the peer went away while we were sending
            log.info("connection ended: %s", exc)
        finally:
            for task in list(self.tasks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def respond(self, hear: Hear) -> None:
        """Answer one response.create: hear, speak, stream. Failures end it as `failed`."""
        try:
            text = await self._hear(hear)
            await self.flush()
            if text is not None:
                await self._speak(hear.response_id, text)
        except ConnectionError as exc:  # the socket went away under us
            log.info("response %s ended: %s", hear.response_id, exc)

    async def _hear(self, hear: Hear) -> str | None:
        texts: dict[str, str] = {}
        asr_s = audio_s = 0.0
        if hear.items:
            loop = asyncio.get_running_loop()
            try:
                texts, asr_s, audio_s = await loop.run_in_executor(
                    self.ctx.executor, transcribe_items, self.ctx.transcriber, hear.items, hear.rate
                )
            # any ASR failure ends this response (counted); the connection goes on
            except Exception as exc:
                self.conv.fail(hear.response_id, "asr-failed", f"speech recognition failed: {exc}")
                return None
            self.ctx.stats.asr_calls += len(hear.items)
            self.ctx.stats.asr_seconds += asr_s
            self.ctx.stats.asr_audio_seconds += audio_s
        log.info(
            "turn %s: heard %r (%d new item(s), %.1f s of audio, ASR %.2f s)",
            hear.response_id,
            " | ".join(texts.values()),
            len(texts),
            audio_s,
            asr_s,
        )
        return self.conv.heard(hear.response_id, texts)

    async def _speak(self, response_id: str, text: str) -> None:
        try:
            pcm = await self.ctx.speaker.synthesize(text)
        except TtsError as exc:
            self.conv.fail(response_id, "tts-failed", str(exc))
            await self.flush()
            return
        if not self.conv.spoken(response_id, pcm.astype("<i2").tobytes()):
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        while self.conv.next_chunk(response_id):
            await self.flush()
            ahead = (
                started + self.conv.sent_seconds(response_id) / self.ctx.pace - loop.time()
                if self.ctx.pace
                else 0.0
            )
            await asyncio.sleep(max(0.0, ahead))  # also lets a response.cancel in
        await self.flush()


# HTTP ------------------------------------------------------------------------------------------
CTX = web.AppKey("agent", AgentContext)


def authorized(request: web.Request, key: str | None) -> bool:
    """No key configured, or `Authorization: Bearer <key>` matches (constant time)."""
    if key is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "missing or wrong Authorization: Bearer <key>"},
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def realtime(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    if not authorized(request, ctx.key):
        ctx.stats.error("unauthorized")
        return _unauthorized()
    # Events up to 4x the cap still arrive and get an `oversized` error; beyond, aiohttp closes.
    ws = web.WebSocketResponse(max_msg_size=4 * rt.MAX_EVENT_BYTES)
    await ws.prepare(request)
    ctx.stats.connections += 1
    ctx.stats.open_connections += 1
    try:
        await Connection(ws, ctx).run()
    finally:
        ctx.stats.open_connections -= 1
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if not authorized(request, ctx.key):
        return _unauthorized()
    return web.json_response(ctx.stats.as_dict())


def create_app(
    transcriber: Transcriber,
    speaker: Speaker,
    *,
    key: str | None = None,
    pace: float | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> web.Application:
    """The agent's aiohttp application: /v1/realtime, /v1/stats, /healthz."""
    own_executor = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")
    app = web.Application()
    app[CTX] = AgentContext(transcriber, speaker, pool, key or None, pace)
    app.router.add_get(PATH, realtime)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/healthz", healthz)

    async def close_executor(app: web.Application) -> None:
        if own_executor:
            pool.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close_executor)
    return app


async def start_agent(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve `app` on host:port (0: any free port); the runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return runner, (str(bound[0]), int(bound[1]))


def ws_url(addr: tuple[str, int]) -> str:
    """ws://HOST:PORT/v1/realtime (IPv6 hosts bracketed)."""
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"ws://{host}:{addr[1]}{PATH}"
