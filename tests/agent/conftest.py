"""Shared by the agent tests: one Whisper model and one espeak-ng voice per test session, the
test utterances, and an in-process reference agent on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest

from voicerelay.agent.asr import Transcriber, to_asr_rate
from voicerelay.agent.server import create_app, start_agent, ws_url
from voicerelay.agent.tts import Speaker
from voicerelay.voice.realtime import REALTIME_RATE

FIRST_TURN = "hello world. what is the weather today"
SECOND_TURN = "please call me tomorrow"


@pytest.fixture(scope="session")
def transcriber() -> Transcriber:
    return Transcriber()


@pytest.fixture(scope="session")
def speaker() -> Speaker:
    return Speaker()


@pytest.fixture(scope="session")
def first_turn(speaker: Speaker) -> np.ndarray:
    """FIRST_TURN spoken by espeak-ng: int16 mono at 24 kHz."""
    return speaker.synthesize_sync(FIRST_TURN)


@pytest.fixture(scope="session")
def second_turn(speaker: Speaker) -> np.ndarray:
    return speaker.synthesize_sync(SECOND_TURN)


def transcribe24k(transcriber: Transcriber, pcm: bytes | np.ndarray) -> str:
    """What Whisper hears in 24 kHz int16 PCM (lower case)."""
    samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes) else pcm
    return transcriber.transcribe(to_asr_rate(samples, REALTIME_RATE)).lower()


@contextlib.asynccontextmanager
async def running_agent(
    transcriber: Transcriber, speaker: Speaker, **options: object
) -> AsyncIterator[str]:
    """A reference agent in this event loop on 127.0.0.1:<free port>; yields its ws:// URL."""
    app = create_app(transcriber, speaker, **options)  # type: ignore[arg-type]
    runner, bound = await start_agent(app, "127.0.0.1", 0)
    try:
        yield ws_url(bound)
    finally:
        await runner.cleanup()
