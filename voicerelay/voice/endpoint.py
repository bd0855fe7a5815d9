"""Endpointing: per-frame voice activity (webrtcvad) turned into speech-started and turn-ended
events, sans-IO apart from the VAD's own C call.

- Speech starts after `start_ms` of consecutive voiced frames; `SpeechStarted.at` is the arrival
  of the first voiced frame of that run.
- While speaking, the turn ends at the first frame that completes `hangover_ms` of consecutive
  unvoiced frames: `TurnEnded.speech_ended_at` is the arrival of the last voiced frame, `at` the
  deciding frame's, `speech_ms` the voiced audio of the turn (the starting run included).
- Frames quieter than `min_rms` (int16 units) count as unvoiced without asking the VAD.
- Warm-up: webrtcvad learns the noise floor from the first ~100 ms of non-silent audio and calls
  those frames speech whatever they hold (the onset of steady noise, e.g. at the start of a
  call, reads as 60-140 ms of speech). So during the first `warmup_ms` of non-silent frames a
  voiced frame is reported unvoiced and cannot start speech; a voiced run that goes on past the
  warm-up (real speech) then starts speech at once, dated from its first frame. Digital silence
  (all-zero frames, e.g. a muted microphone) does not advance the warm-up: the VAD does not
  learn from it either.
- webrtcvad has its own hangover (up to 100 ms at 20 ms frames in modes 2-3): the last voiced
  frame, and so `speech_ended_at`, trails the true end of speech by about that much, and the
  decision comes `hangover_ms` after it.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

from voicerelay.voice.events import SpeechStarted, TurnEnded

VAD_RATES = (8000, 16000, 32000, 48000)
VAD_FRAME_MS = (10, 20, 30)


class TurnTracker:
    """The pure state machine of endpointing: voiced/unvoiced verdicts in, events out."""

    def __init__(self, *, start_frames: int, hangover_frames: int, frame_ms: int) -> None:
        if start_frames < 1 or hangover_frames < 1 or frame_ms < 1:
            raise ValueError("turn tracker: start_frames, hangover_frames, frame_ms must be >= 1")
        self.start_frames = start_frames
        self.hangover_frames = hangover_frames
        self.frame_ms = frame_ms
        self.speaking = False
        self._run = 0  # consecutive voiced frames (idle) or unvoiced frames (speaking)
        self._run_started_at = 0.0
        self._last_voiced_at = 0.0
        self._voiced_in_turn = 0

    def push(
        self, voiced: bool, at: float, *, can_start: bool = True
    ) -> SpeechStarted | TurnEnded | None:
        """One frame's verdict (`at`: arrival of its end). `can_start=False` keeps counting a
        voiced run but does not let it start speech yet (the VAD's warm-up)."""
        if self.speaking:
            return self._speaking(voiced, at)
        return self._idle(voiced, at, can_start)

    def _idle(self, voiced: bool, at: float, can_start: bool) -> SpeechStarted | None:
        if not voiced:
            self._run = 0
            return None
        if self._run == 0:
            self._run_started_at = at
        self._run += 1
        self._last_voiced_at = at
        if not can_start or self._run < self.start_frames:
            return None
        self.speaking = True
        self._voiced_in_turn, self._run = self._run, 0
        return SpeechStarted(self._run_started_at)

    def _speaking(self, voiced: bool, at: float) -> TurnEnded | None:
        if voiced:
            self._run = 0
            self._voiced_in_turn += 1
            self._last_voiced_at = at
            return None
        self._run += 1
        if self._run < self.hangover_frames:
            return None
        ended = TurnEnded(at, self._last_voiced_at, self._voiced_in_turn * self.frame_ms)
        self.reset()
        return ended

    def reset(self) -> None:
        """Forget any speech in progress (no event)."""
        self.speaking = False
        self._run = 0
        self._voiced_in_turn = 0


class Endpointer:
    """Feed one frame at a time; get (voiced?, events)."""

    def __init__(
        self,
        *,
        sample_rate: int = 48000,
        aggressiveness: int = 2,
        start_ms: int = 60,
        hangover_ms: int = 200,
        frame_ms: int = 20,
        min_rms: float = 0.0,
        warmup_ms: int = 120,
    ) -> None:
        _validate(sample_rate, aggressiveness, start_ms, hangover_ms, frame_ms, min_rms, warmup_ms)
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.frame_samples = sample_rate * frame_ms // 1000
        self.min_rms = min_rms
        self.turns = TurnTracker(
            start_frames=max(1, _frames(start_ms, frame_ms)),
            hangover_frames=max(1, _frames(hangover_ms, frame_ms)),
            frame_ms=frame_ms,
        )
        self._warmup_left = _frames(warmup_ms, frame_ms)  # non-silent frames still to learn from
        self._vad = webrtcvad.Vad(aggressiveness)
        self.counters: dict[str, int] = {"frames": 0, "voiced": 0, "turns": 0}

    @property
    def speaking(self) -> bool:
        """True between SpeechStarted and TurnEnded."""
        return self.turns.speaking

    def vad(self, pcm: np.ndarray) -> bool:
        """The VAD's own verdict on one frame (after the `min_rms` gate; no warm-up)."""
        if pcm.dtype != np.int16 or pcm.shape != (self.frame_samples,):
            raise ValueError(
                f"endpointer takes {self.frame_ms} ms frames: {self.frame_samples} int16 "
                f"samples, not shape {pcm.shape} of {pcm.dtype}"
            )
        if self.min_rms > 0 and _rms(pcm) < self.min_rms:
            return False
        return self._vad.is_speech(pcm.tobytes(), self.sample_rate)

    def push(self, pcm: np.ndarray, at: float) -> tuple[bool, list[SpeechStarted | TurnEnded]]:
        """One frame, `at` = arrival of its end. Returns (frame voiced?, events)."""
        speech = self.vad(pcm)
        warming = self._warmup_left > 0
        if warming and pcm.any():
            self._warmup_left -= 1
        event = self.turns.push(speech, at, can_start=not warming)
        voiced = speech and not warming
        self.counters["frames"] += 1
        self.counters["voiced"] += voiced
        if event is None:
            return voiced, []
        if isinstance(event, TurnEnded):
            self.counters["turns"] += 1
        return voiced, [event]

    def reset(self) -> None:
        """Forget any speech in progress (no event); the VAD keeps what it learnt."""
        self.turns.reset()


def _frames(ms: int, frame_ms: int) -> int:
    return -(-ms // frame_ms)  # ceil


def _rms(pcm: np.ndarray) -> float:
    samples = pcm.astype(np.float32)
    return float(np.sqrt(np.dot(samples, samples) / len(samples)))


def _validate(
    sample_rate: int,
    aggressiveness: int,
    start_ms: int,
    hangover_ms: int,
    frame_ms: int,
    min_rms: float,
    warmup_ms: int,
) -> None:
    if sample_rate not in VAD_RATES:
        raise ValueError(f"VAD sample rate {sample_rate} is not supported: use one of {VAD_RATES}")
    if frame_ms not in VAD_FRAME_MS:
        raise ValueError(f"VAD frame of {frame_ms} ms is not supported: use one of {VAD_FRAME_MS}")
    if aggressiveness not in (0, 1, 2, 3):
        raise ValueError(f"VAD aggressiveness {aggressiveness} is out of range: use 0-3")
    if min(start_ms, hangover_ms, min_rms, warmup_ms) < 0:
        raise ValueError("endpointer: start_ms, hangover_ms, min_rms, warmup_ms must be >= 0")
