"""Endpointing: per-frame voice activity (webrtcvad, checked against the frame's energy) turned
into speech-started and turn-ended events, sans-IO apart from the VAD's own C call.

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
- Offset detection (`OffsetDetector`): webrtcvad has its own hangover (60-120 ms at 20 ms frames
  in mode 2), so its last voiced frame trails the true end of speech by that much, and a
  hangover counted from it decides late. While speaking, the frame's energy overrules the VAD
  where it is clear-cut: a frame that sounds like the tracked noise (or lies 35 dB under the
  turn's own level) is unvoiced, one well above the noise and within 35 dB of the turn's level
  is voiced. So the hangover counts from the real end of speech, and `speech_ended_at` is that
  end to within a frame. Where the turn's speech stands less than 12 dB above the noise, energy
  is no guide: the VAD's verdict stands alone, and the decision comes 60-120 ms later.

Why hangover 240 ms with offset detection (bench/vad_choice.py: espeak-ng, 12 sentences, 7 with
commas, in 3 voices, clean and in 20 and 10 dB white noise: 108 sentences; the delay runs from
a sentence's true end to the decision, a split is a turn ended at a pause inside one):

    hangover  how              p50 / p90 ms   splits clean/20/10 dB
    200       VAD alone        318 / 326       0/5/11   (before)
    120       VAD alone        238 / 246       4/15/24
    140       VAD alone        258 / 266       0/8/23
    220       offset detector  220 / 226       6/13/23
    240       offset detector  240 / 246       1/6/16   (default)
    260       offset detector  260 / 266       0/1/14

240 ms is the longest hangover whose p50 meets the 250 ms budget in every condition (the VAD
alone needs 120 ms for that, and then splits twice as often). The splits left are at commas of
~250 ms and more; at 10 dB the weak sound after a comma ("four, five, six") drowns in the noise
and the pause reads longer. A split answers half a sentence: the person goes on about 100 ms
after the decision. Speech starts are unchanged (p50 61-72 ms after the onset). Beyond the
budget: pink and wobbling noise at 10 dB p50 240 ms; at 5 dB energy stands aside (p50 320 ms).
webrtcvad fed 10 ms halves instead trails the end by 100 ms rather than 118 (p50): not enough.
CPU: 14.6 us a frame before, 16.0 us with the energy check.
"""

from __future__ import annotations

import math

import numpy as np
import webrtcvad

from voicerelay.voice.events import SpeechStarted, TurnEnded

VAD_RATES = (8000, 16000, 32000, 48000)
VAD_FRAME_MS = (10, 20, 30)
DEFAULT_HANGOVER_MS = 240
SILENCE_DB = 10.0  # frame energy (dB re 1 LSB^2; rms ~3 LSB, -80 dBFS) that is silence anyway


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


class OffsetDetector:
    """The frame's energy as a second opinion on the VAD's verdict while a turn is in progress.

    Energies are dB of a frame's mean square (re 1 LSB^2). Learnt from every frame:
    - the noise: an exponential mean and mean absolute deviation of the energies of frames the
      VAD calls unvoiced (over about `1 / noise_rate` such frames; a plain average until there
      are that many). Its ceiling, mean + `spread` deviations + `margin_db`, is about as loud as
      the noise gets;
    - the speech level: the loudest recent frame the VAD calls voiced (instant attack; each
      voiced frame pulls it `release` of the way towards itself).

    While speaking, and only if the level stands `min_snr_db` above the noise ceiling, a frame is
    unvoiced if it is under max(noise ceiling, level - `range_db`, SILENCE_DB) (it sounds like the
    noise, or is a far tail of the last word), voiced if it is `clear_db` over the noise ceiling
    and within `range_db` of the level (the VAD often misses the first frame of a word after a
    pause), and otherwise what the VAD says.
    """

    def __init__(
        self,
        *,
        noise_rate: float = 0.02,
        spread: float = 0.5,
        margin_db: float = 0.5,
        clear_db: float = 6.0,
        range_db: float = 35.0,
        min_snr_db: float = 12.0,
        release: float = 0.01,
    ) -> None:
        if not (0 < noise_rate <= 1 and 0 < release <= 1):
            raise ValueError("offset detector: noise_rate and release must be in (0, 1]")
        if min(spread, margin_db, clear_db, range_db, min_snr_db) < 0:
            raise ValueError("offset detector: spreads and margins must be >= 0")
        self.noise_rate = noise_rate
        self.spread = spread
        self.margin_db = margin_db
        self.clear_db = clear_db
        self.range_db = range_db
        self.min_snr_db = min_snr_db
        self.release = release
        self.noise_db: float | None = None  # mean energy of unvoiced frames
        self.deviation_db = 0.0  # their mean absolute deviation from it
        self.level_db: float | None = None  # the speech level
        self._noise_frames = 0

    @property
    def noise_ceiling_db(self) -> float | None:
        """About as loud as the noise gets (None before the first unvoiced frame)."""
        if self.noise_db is None:
            return None
        return self.noise_db + self.spread * self.deviation_db + self.margin_db

    def judge(self, energy_db: float, vad_voiced: bool, speaking: bool) -> bool:
        """One frame's verdict: the VAD's, unless speaking and its energy is clear-cut. Learns
        from the frame after judging it."""
        verdict = self._overrule(energy_db, vad_voiced) if speaking else vad_voiced
        self._learn(energy_db, vad_voiced)
        return verdict

    def _overrule(self, energy_db: float, vad_voiced: bool) -> bool:
        ceiling, level = self.noise_ceiling_db, self.level_db
        if ceiling is None or level is None or level - ceiling < self.min_snr_db:
            return vad_voiced
        quiet_under = max(ceiling, level - self.range_db, SILENCE_DB)
        if energy_db < quiet_under:
            return False
        if energy_db >= max(ceiling + self.clear_db, quiet_under):
            return True
        return vad_voiced

    def _learn(self, energy_db: float, vad_voiced: bool) -> None:
        if vad_voiced:
            ceiling = self.noise_ceiling_db
            if ceiling is not None and energy_db < ceiling:
                return  # the VAD's own hangover, or speech under the noise: not a speech level
            level = self.level_db
            if level is None or energy_db > level:
                self.level_db = energy_db
            else:
                self.level_db = level + self.release * (energy_db - level)
            return
        self._noise_frames += 1
        rate = max(self.noise_rate, 1.0 / self._noise_frames)
        noise = energy_db if self.noise_db is None else self.noise_db
        noise += rate * (energy_db - noise)
        self.deviation_db += rate * (abs(energy_db - noise) - self.deviation_db)
        self.noise_db = noise


class Endpointer:
    """Feed one frame at a time; get (voiced?, events).

    `offset` is the `OffsetDetector` that checks the VAD while speaking; set it to None for the
    VAD's verdict alone (how the bench measures what it brings)."""

    def __init__(
        self,
        *,
        sample_rate: int = 48000,
        aggressiveness: int = 2,
        start_ms: int = 60,
        hangover_ms: int = DEFAULT_HANGOVER_MS,
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
        self.offset: OffsetDetector | None = OffsetDetector()
        self._warmup_left = _frames(warmup_ms, frame_ms)  # non-silent frames still to learn from
        self._vad = webrtcvad.Vad(aggressiveness)
        self.counters: dict[str, int] = {
            "frames": 0,
            "voiced": 0,
            "turns": 0,
            "energy_unvoiced": 0,  # the VAD said voiced, the energy check unvoiced
            "energy_voiced": 0,  # and the other way round
        }

    @property
    def speaking(self) -> bool:
        """True between SpeechStarted and TurnEnded."""
        return self.turns.speaking

    def vad(self, pcm: np.ndarray) -> bool:
        """The VAD's own verdict on one frame (after the `min_rms` gate; no warm-up, no energy
        check)."""
        return self._vad_verdict(pcm, self._mean_square(pcm))

    def push(self, pcm: np.ndarray, at: float) -> tuple[bool, list[SpeechStarted | TurnEnded]]:
        """One frame, `at` = arrival of its end. Returns (frame voiced?, events)."""
        mean_square = self._mean_square(pcm)
        speech = self._vad_verdict(pcm, mean_square)
        if self.offset is not None:
            judged = self.offset.judge(_db(mean_square), speech, self.turns.speaking)
            if judged != speech:
                self.counters["energy_voiced" if judged else "energy_unvoiced"] += 1
                speech = judged
        warming = self._warmup_left > 0
        if warming and mean_square > 0:
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
        """Forget any speech in progress (no event); the VAD and the offset detector keep what
        they learnt."""
        self.turns.reset()

    def _mean_square(self, pcm: np.ndarray) -> float:
        if pcm.dtype != np.int16 or pcm.shape != (self.frame_samples,):
            raise ValueError(
                f"endpointer takes {self.frame_ms} ms frames: {self.frame_samples} int16 "
                f"samples, not shape {pcm.shape} of {pcm.dtype}"
            )
        samples = pcm.astype(np.float32)
        return float(np.dot(samples, samples)) / len(samples)

    def _vad_verdict(self, pcm: np.ndarray, mean_square: float) -> bool:
        if self.min_rms > 0 and mean_square < self.min_rms * self.min_rms:
            return False
        return self._vad.is_speech(pcm.tobytes(), self.sample_rate)


def _frames(ms: int, frame_ms: int) -> int:
    return -(-ms // frame_ms)  # ceil


def _db(mean_square: float) -> float:
    """A frame's energy in dB re 1 LSB^2 (+1 keeps digital silence at 0 dB)."""
    return 10.0 * math.log10(mean_square + 1.0)


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
