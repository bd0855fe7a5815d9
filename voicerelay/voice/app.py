"""The voice-agent API: what a developer writes (`VoiceAgent`) and the handle it gets (`AgentCall`).

    class Parrot:
        sample_rate = 16000
        async def run(self, call: AgentCall) -> None:
            heard = []
            async for event in call.events():
                if isinstance(event, AudioIn) and event.speech:
                    heard.append(event.pcm)
                elif isinstance(event, TurnEnded) and heard:
                    call.play(np.concatenate(heard), item_id="reply")
                    call.finish("reply")
                    heard = []

`AgentCall` is the thin asyncio shell over one call's sans-IO `CallAudio`: the transceiver
delivers the core's events into it after every datagram and timer, and everything the agent
does (`play`, `finish`, `interrupt`) goes into the core and then `wake`s the transceiver, which
sends what is due and re-arms the call's timer (aioquic's transmit-after-input rule).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import numpy as np

from voicerelay.voice.events import (
    CallEnded,
    Interrupted,
    PlaybackDone,
    SpeechStarted,
    TurnEnded,
    VoiceEvent,
)
from voicerelay.voice.pipeline import CallAudio

log = logging.getLogger("voicerelay.voice")


class VoiceAgent(Protocol):
    """A voice app that hears decoded audio and speaks PCM. One `run` per call."""

    sample_rate: int  # the rate of the PCM it hears and plays (e.g. 16000, 24000)

    async def run(self, call: AgentCall) -> None: ...


class Publisher(Protocol):
    """Where conversation events for pages go (the call's `EventFeed`)."""

    def publish(self, type: str, now: float, **fields: Any) -> None: ...


class AgentCall:
    """One call as its agent sees it: an event stream in, PCM out."""

    def __init__(
        self,
        call_id: str,
        audio: CallAudio,
        *,
        wake: Callable[[], None],
        clock: Callable[[], float],
        feed: Publisher | None = None,
    ) -> None:
        self.id = call_id
        self.audio = audio
        self.sample_rate = audio.config.agent_rate
        self.clock = clock
        self._wake = wake
        self._feed = feed
        self._queue: asyncio.Queue[VoiceEvent] = asyncio.Queue()
        self.ended = False

    # What the agent calls ---------------------------------------------------------------------
    async def events(self) -> AsyncIterator[VoiceEvent]:
        """Every event of the call in order; ends after `CallEnded`."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, CallEnded):
                return

    def play(self, pcm: np.ndarray | bytes, item_id: str | None = None) -> None:
        """Queue agent audio: int16 mono at `sample_rate` (bytes: little-endian int16)."""
        if self.ended:
            return
        if isinstance(pcm, bytes | bytearray | memoryview):
            pcm = np.frombuffer(pcm, dtype="<i2")
        self.audio.play(pcm, item_id, self.clock())
        self._wake()

    def finish(self, item_id: str | None = None) -> None:
        """No more audio for `item_id`: it plays to its end, then `PlaybackDone` arrives."""
        if self.ended:
            return
        self.audio.finish(item_id, self.clock())
        self._wake()

    def interrupt(self) -> tuple[str | None, int]:
        """Stop speaking now: drop queued audio; returns (item, ms of it that went out)."""
        cut = self.audio.interrupt(self.clock())
        self._wake()
        return cut

    def publish(self, type: str, **fields: Any) -> None:
        """A conversation event for pages (docs/VOICE.md lists the types)."""
        if self._feed is not None:
            self._feed.publish(type, self.clock(), **fields)

    # What the transceiver calls ---------------------------------------------------------------
    def deliver(self) -> None:
        """Move the core's new events to the agent (and the page's feed)."""
        for event in self.audio.events():
            if isinstance(event, CallEnded):
                self.ended = True
            self._queue.put_nowait(event)
            self._announce(event)

    def _announce(self, event: VoiceEvent) -> None:
        feed = self._feed
        if feed is None:
            return
        if isinstance(event, SpeechStarted):  # (call.started: the server, for every app)
            feed.publish("user.speech_started", event.at)
        elif isinstance(event, TurnEnded):
            feed.publish("user.turn_ended", event.at, speech_ms=event.speech_ms)
        elif isinstance(event, Interrupted):
            feed.publish(
                "agent.interrupted", event.at, item_id=event.item_id, sent_ms=event.sent_ms
            )
        elif isinstance(event, PlaybackDone):
            feed.publish("agent.done", event.at, item_id=event.item_id, sent_ms=event.sent_ms)


async def run_agent(agent: VoiceAgent, call: AgentCall) -> None:
    """Run one call's agent; its failure is logged and never reaches the transceiver."""
    try:
        await agent.run(call)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("voice agent failed on call %s", call.id)
