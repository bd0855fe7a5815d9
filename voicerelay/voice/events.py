"""What a call tells its voice agent: small immutable events, times on the call's clock.

PCM everywhere is mono int16 in a 1-D numpy array at the agent's sample rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CallStarted:
    """Media is flowing (DTLS is up): the agent may speak."""

    at: float
    sample_rate: int


@dataclass(frozen=True, eq=False)
class AudioIn:
    """One 20 ms frame of the person's audio (concealed frames included), in arrival order."""

    at: float
    pcm: np.ndarray = field(repr=False)
    speech: bool  # the VAD's verdict on this frame


@dataclass(frozen=True)
class SpeechStarted:
    """The person started speaking (`at`: when the first voiced frame arrived)."""

    at: float


@dataclass(frozen=True)
class TurnEnded:
    """The person stopped speaking: `speech_ended_at` is the end of the last voiced frame,
    `at` when the endpointer decided (after its hangover)."""

    at: float
    speech_ended_at: float
    speech_ms: int


@dataclass(frozen=True)
class Interrupted:
    """Barge-in: the person spoke over the agent. Queued agent audio was dropped at once;
    `sent_ms` of item `item_id` had actually gone out on the wire."""

    at: float
    item_id: str | None
    sent_ms: int


@dataclass(frozen=True)
class PlaybackDone:
    """Every queued frame of `item_id` went out (`sent_ms` of audio)."""

    at: float
    item_id: str | None
    sent_ms: int


@dataclass(frozen=True)
class CallEnded:
    at: float
    reason: str


VoiceEvent = (
    CallStarted | AudioIn | SpeechStarted | TurnEnded | Interrupted | PlaybackDone | CallEnded
)
