"""`RealtimeBridge`: a voice agent that carries each call to a Realtime-compatible backend.

One WebSocket per call, opened when the call's media is up, speaking the subset of the OpenAI
Realtime API in docs/REALTIME.md. The transceiver endpoints (turn detection is off upstream):
the person's audio from speech start (with a pre-roll) to turn end is appended, then committed
with `response.create`; at barge-in the response is cancelled and the agent's item truncated to
what was actually sent. A backend that fails (refused, closed, garbage, oversized, bad audio,
silent) gets a counted outcome, the caller hears a short prompt, and the call stays up; the next
turn tries a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from dataclasses import dataclass

import aiohttp
import numpy as np

from voicerelay.voice import realtime
from voicerelay.voice.app import AgentCall
from voicerelay.voice.events import (
    AudioIn,
    CallEnded,
    Interrupted,
    PlaybackDone,
    SpeechStarted,
    TurnEnded,
    VoiceEvent,
)

log = logging.getLogger("voicerelay.bridge")
PROMPT_ITEM = "voicerelay-unavailable"  # our own prompt's item id: never truncated upstream


class BackendFailure(Exception):
    """The backend cannot carry this turn; `reason` is the counted outcome."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class BridgeConfig:
    url: str  # ws:// or wss:// of the backend's Realtime endpoint
    key: str | None = None  # sent as `Authorization: Bearer <key>`
    connect_timeout: float = 5.0
    response_timeout: float = 15.0  # response.create -> first audio (ASR + TTS on the backend)
    stall_timeout: float = 5.0  # no event at all while a response is running
    preroll_ms: int = 300  # audio before the detected speech start that is sent too
    append_ms: int = 100  # audio per input_audio_buffer.append
    max_event_bytes: int = realtime.MAX_EVENT_BYTES
    instructions: str | None = None
    voice: str | None = None


def unavailable_prompt(rate: int) -> np.ndarray:
    """The 'agent unavailable' prompt: two falling beeps, 0.6 s, int16 at `rate`."""
    parts = []
    for freq in (660.0, 440.0):
        t = np.arange(int(0.18 * rate)) / rate
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades, no clicks
        parts += [0.3 * np.sin(2 * np.pi * freq * t) * ramp, np.zeros(int(0.08 * rate))]
    return (np.concatenate(parts) * 32767).astype(np.int16)


class RealtimeBridge:
    """The `VoiceAgent` for a Realtime-compatible backend; `counters` add up every call's
    outcomes (connections, turns, responses, interruptions, failures by reason)."""

    sample_rate = realtime.REALTIME_RATE

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()

    async def run(self, call: AgentCall) -> None:
        async with aiohttp.ClientSession() as http:
            await _BridgedCall(self, call, http).run()


class _BridgedCall:
    """One call's bridge: the agent's event loop and the backend's reader."""

    def __init__(self, bridge: RealtimeBridge, call: AgentCall, http: aiohttp.ClientSession):
        self.bridge = bridge
        self.config = bridge.config
        self.counters = bridge.counters
        self.call = call
        self.http = http
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task | None = None
        frames = max(1, self.config.preroll_ms // 20)
        self.preroll: deque[np.ndarray] = deque(maxlen=frames)
        self.pending: list[np.ndarray] = []  # speech not yet appended
        self.speaking = False
        self.response_id: str | None = None  # the response being played
        self.cancelled: set[str] = set()
        self.item_id: str | None = None  # the agent item being played
        self.deadline: asyncio.TimerHandle | None = None
        self.down_reason: str | None = None
        self.awaiting = False  # response.create sent, response.created not seen yet
        self.cancel_created = False  # cancelled before its response.created arrived

    # The call's side --------------------------------------------------------------------------
    async def run(self) -> None:
        await self._connect()
        try:
            async for event in self.call.events():
                await self._on_event(event)
                if isinstance(event, CallEnded):
                    break
        finally:
            await self._disconnect()

    async def _on_event(self, event: VoiceEvent) -> None:
        if isinstance(event, AudioIn):
            if self.speaking:
                self.pending.append(event.pcm)
                if len(self.pending) * 20 >= self.config.append_ms:
                    await self._append()
            else:
                self.preroll.append(event.pcm)
        elif isinstance(event, SpeechStarted):
            self.speaking = True
            self.pending = list(self.preroll)
            self.preroll.clear()
            await self._drop_unplayed_response()
        elif isinstance(event, TurnEnded):
            self.speaking = False
            self.counters["turns"] += 1
            await self._end_turn()
        elif isinstance(event, Interrupted):
            await self._barge_in(event)
        elif isinstance(event, PlaybackDone) and event.item_id == self.item_id:
            self.item_id = None

    async def _append(self) -> None:
        pcm, self.pending = self.pending, []
        if pcm and self.ws is not None:
            await self._send(realtime.input_audio_append(np.concatenate(pcm).tobytes()))

    async def _end_turn(self) -> None:
        if self.ws is None and not await self._connect():
            return  # the caller was told
        try:
            await self._append()
            await self._send(realtime.input_audio_commit())
            await self._send(realtime.response_create())
        except BackendFailure as exc:
            self._fail(exc)
            return
        self.awaiting = True
        self._arm(self.config.response_timeout, "response-timeout")

    async def _drop_unplayed_response(self) -> None:
        """The person went on speaking before the reply to their last turn played (the turn
        had ended at a pause): that reply is stale; cancel it upstream."""
        if self.ws is None or self.item_id is not None:
            return  # nothing requested, or it is playing (the barge-in path handles that)
        if self.awaiting or self.response_id is not None:
            try:
                await self._send(realtime.response_cancel(self.response_id))
            except BackendFailure as exc:
                self._fail(exc)
                return
            self.counters["stale_responses"] += 1
            if self.response_id is not None:
                self.cancelled.add(self.response_id)
            self.cancel_created = self.awaiting  # its response.created is still to come
            self.awaiting, self.response_id = False, None
            self._disarm()

    async def _barge_in(self, event: Interrupted) -> None:
        self.counters["interruptions"] += 1
        response, item = self.response_id, event.item_id or self.item_id
        self.response_id, self.item_id = None, None
        self._disarm()
        if self.ws is None:
            return
        try:
            if response is not None:
                self.cancelled.add(response)
                await self._send(realtime.response_cancel(response))
            if item is not None and item != PROMPT_ITEM:
                await self._send(realtime.item_truncate(item, event.sent_ms))
                self.counters["truncations"] += 1
        except BackendFailure as exc:
            self._fail(exc)

    # The backend's side -----------------------------------------------------------------------
    async def _connect(self) -> bool:
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.key}"} if cfg.key else {}
        try:
            self.ws = await asyncio.wait_for(
                self.http.ws_connect(
                    cfg.url, headers=headers, max_msg_size=cfg.max_event_bytes, autoping=True
                ),
                cfg.connect_timeout,
            )
        except TimeoutError:
            self._fail(BackendFailure("connect-timeout", cfg.url))
            return False
        except aiohttp.WSServerHandshakeError as exc:
            self._fail(BackendFailure("connect-refused", f"HTTP {exc.status}"))
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(BackendFailure("connect-refused", str(exc)))
            return False
        self.counters["connections"] += 1
        self.down_reason = None
        self.reader = asyncio.get_running_loop().create_task(self._read(self.ws))
        try:
            await self._send(
                realtime.session_update(instructions=cfg.instructions, voice=cfg.voice)
            )
        except BackendFailure as exc:
            self._fail(exc)
            return False
        return True

    async def _disconnect(self) -> None:
        self._disarm()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None

    async def _send(self, text: str) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            raise BackendFailure("closed", "the backend connection is closed")
        try:
            await ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise BackendFailure("closed", str(exc)) from None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._on_server_event(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    raise BackendFailure("not-json", "binary message")
                elif message.type == aiohttp.WSMsgType.ERROR:
                    too_big = ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                    raise BackendFailure("oversized" if too_big else "closed", str(message.data))
            raise BackendFailure("closed", f"the backend closed the connection ({ws.close_code})")
        except BackendFailure as exc:
            if self.ws is ws:
                self._fail(exc)

    def _on_server_event(self, text: str) -> None:
        try:
            event = realtime.parse_server_event(text, self.config.max_event_bytes)
        except realtime.ProtocolError as exc:
            raise BackendFailure(exc.reason, str(exc)) from None
        call = self.call
        if isinstance(event, realtime.ResponseCreated):
            if self.cancel_created:
                self.cancel_created = False
                self.cancelled.add(event.response_id)
                return
            self.awaiting = False
            self.response_id = event.response_id
            self.counters["responses"] += 1
            self._arm(self.config.response_timeout, "response-timeout")
        elif isinstance(event, realtime.AudioDelta):
            if event.response_id in self.cancelled:
                return  # in flight when we cancelled it
            if self.item_id != event.item_id:
                self.item_id = event.item_id
                call.publish("agent.speaking", item_id=event.item_id)
            self._arm(self.config.stall_timeout, "stalled")
            call.play(event.pcm, event.item_id)
        elif isinstance(event, realtime.AudioDone):
            if event.response_id not in self.cancelled:
                call.finish(event.item_id)
        elif isinstance(event, realtime.ResponseDone):
            if self.response_id == event.response_id:
                self.response_id = None
            self.cancelled.discard(event.response_id)
            self._disarm()
            if event.status == "failed":
                self._fail(BackendFailure("response-failed", event.response_id))
        elif isinstance(event, realtime.InputTranscript):
            call.publish("user.transcript", item_id=event.item_id, text=event.transcript)
        elif isinstance(event, realtime.TranscriptDelta):
            if event.response_id not in self.cancelled:
                call.publish(
                    "agent.transcript", item_id=event.item_id, text=event.delta, final=False
                )
        elif isinstance(event, realtime.TranscriptDone):
            call.publish(
                "agent.transcript", item_id=event.item_id, text=event.transcript, final=True
            )
        elif isinstance(event, realtime.ServerError):
            self.counters["backend_errors"] += 1
            log.warning("call %s: the backend reported an error: %s", call.id, event.message)
            if self.awaiting:  # our response.create failed: tell the caller
                self._fail(BackendFailure("backend-error", event.message))
            # else: e.g. a cancel or truncate that crossed the reply's end: counted only

    # Failures ---------------------------------------------------------------------------------
    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(
            seconds, lambda: self._fail(BackendFailure(reason, f"nothing for {seconds:g} s"))
        )

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _fail(self, exc: BackendFailure) -> None:
        """Count it, drop the connection, tell the caller; the call itself goes on."""
        self.counters[f"failures_{exc.reason}"] += 1
        log.warning("call %s: agent backend unavailable (%s)", self.call.id, exc)
        self._disarm()
        ws, self.ws = self.ws, None
        if ws is not None:
            asyncio.get_running_loop().create_task(ws.close())
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        self.reader = None
        self.response_id = None
        self.awaiting = False
        self.down_reason = exc.reason
        self._tell_caller()

    def _tell_caller(self) -> None:
        call = self.call
        call.interrupt()
        call.publish("agent.unavailable", reason=self.down_reason or "unavailable")
        call.play(unavailable_prompt(call.sample_rate), PROMPT_ITEM)
        call.finish(PROMPT_ITEM)
        self.item_id = PROMPT_ITEM
