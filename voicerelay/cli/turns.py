"""Turn timing of a call from what was played and what came back (pure numpy, no I/O).

Both signals are mono int16 on one timeline: sample 0 is the first frame the caller sent, and
a received sample sits where it arrived. Speech is found by short-term energy (RMS in dBFS over
10 ms windows) with hysteresis: a segment starts at a window at or above `on_dbfs` and lasts
while windows stay at or above `off_dbfs`; segments closer than 300 ms are merged, and what is
then shorter than 100 ms is a blip and ignored.

Each played segment (the person's speech) is paired with the first reply that starts after it
ends and before the person speaks again: `response_ms` is then the voice-to-voice latency as the
caller feels it. A segment with no such reply but one that started while the person was still
speaking (an echo, a barge-in) is paired with that one and flagged `overlap`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RATE = 48000
WINDOW_S = 0.010
ON_DBFS = -40.0  # a window this loud starts speech
OFF_DBFS = -50.0  # speech lasts while windows stay at least this loud
MERGE_GAP_S = 0.300
MIN_SEGMENT_S = 0.100
SILENCE_DBFS = -200.0  # what digital silence measures


@dataclass(frozen=True)
class Segment:
    """Sound on the timeline, in seconds from its start."""

    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Turn:
    """The person spoke from `spoke_from_s` to `spoke_to_s`; the far end answered (or not)."""

    spoke_from_s: float
    spoke_to_s: float
    reply_from_s: float | None
    reply_to_s: float | None
    response_ms: float | None  # reply start - end of the person's speech (negative if overlap)
    overlap: bool  # the reply started while the person was still speaking


@dataclass(frozen=True)
class TurnAnalysis:
    """Segments found on both sides, the turns they make, and the replies that overlapped."""

    spoken: tuple[Segment, ...]
    replies: tuple[Segment, ...]
    turns: tuple[Turn, ...]
    overlaps: tuple[Segment, ...]  # every reply that started while the person was speaking

    @property
    def median_response_ms(self) -> float | None:
        """Median latency of the replies that waited for the person to stop (None if none)."""
        waited = [t.response_ms for t in self.turns if not t.overlap and t.response_ms is not None]
        return statistics.median(waited) if waited else None


def _samples(signal: np.ndarray) -> np.ndarray:
    """Any numeric array as flat float64 samples in the int16 range (NaN and inf as 0)."""
    values = np.nan_to_num(np.asarray(signal, dtype=np.float64).ravel(), posinf=0.0, neginf=0.0)
    return np.clip(values, -32768.0, 32767.0)


def dbfs(pcm: np.ndarray) -> float:
    """RMS level of int16-scaled samples in dB relative to full scale (silence: -200)."""
    values = _samples(pcm)
    if values.size == 0:
        return SILENCE_DBFS
    rms = math.sqrt(float(np.mean(values * values)))
    return 20.0 * math.log10(rms / 32768.0) if rms > 0 else SILENCE_DBFS


def window_dbfs(signal: np.ndarray, rate: int = RATE, window_s: float = WINDOW_S) -> np.ndarray:
    """RMS level (dBFS) of each `window_s` window; the last, partial window is padded with zeros."""
    values = _samples(signal)
    width = max(1, round(rate * window_s))
    count = -(-values.size // width)
    padded = np.zeros(count * width)
    padded[: values.size] = values
    power = np.mean(padded.reshape(count, width) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        levels = 10.0 * np.log10(power / 32768.0**2)
    return np.maximum(levels, SILENCE_DBFS)


def _hysteresis(levels: np.ndarray, on_dbfs: float, off_dbfs: float) -> np.ndarray:
    """Per window: speaking or not. Above `on` switches on, below `off` switches off, in
    between keeps the previous state (vectorised forward fill; starts off)."""
    decided = np.where(levels >= on_dbfs, 1, np.where(levels < off_dbfs, 0, -1))
    index = np.where(decided >= 0, np.arange(decided.size), -1)
    last = np.maximum.accumulate(index) if index.size else index
    return np.where(last >= 0, decided[np.maximum(last, 0)], 0).astype(bool)


def _runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index pairs of the runs of True."""
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def merge_segments(
    segments: Sequence[Segment],
    merge_gap_s: float = MERGE_GAP_S,
    min_segment_s: float = MIN_SEGMENT_S,
) -> list[Segment]:
    """Join segments separated by less than `merge_gap_s`, then drop those under `min_segment_s`."""
    merged: list[Segment] = []
    for seg in sorted(segments, key=lambda s: s.start_s):
        if merged and seg.start_s - merged[-1].end_s < merge_gap_s:
            merged[-1] = Segment(merged[-1].start_s, max(merged[-1].end_s, seg.end_s))
        else:
            merged.append(seg)
    return [s for s in merged if s.duration_s >= min_segment_s]


def find_segments(
    signal: np.ndarray,
    rate: int = RATE,
    *,
    on_dbfs: float = ON_DBFS,
    off_dbfs: float = OFF_DBFS,
    window_s: float = WINDOW_S,
    merge_gap_s: float = MERGE_GAP_S,
    min_segment_s: float = MIN_SEGMENT_S,
) -> list[Segment]:
    """The sound segments of a mono signal (see the module docstring); never raises."""
    if rate <= 0:
        return []
    values = np.asarray(signal).ravel()
    width = max(1, round(rate * window_s))
    active = _hysteresis(window_dbfs(values, rate, window_s), on_dbfs, off_dbfs)
    length_s = values.size / rate
    raw = [
        Segment(start * width / rate, min(end * width / rate, length_s))
        for start, end in _runs(active)
    ]
    return merge_segments(raw, merge_gap_s, min_segment_s)


def pair_turns(spoken: Sequence[Segment], replies: Sequence[Segment]) -> list[Turn]:
    """One turn per spoken segment, paired with its reply (see the module docstring)."""
    turns = []
    for i, said in enumerate(spoken):
        until = spoken[i + 1].start_s if i + 1 < len(spoken) else math.inf
        mine = [r for r in replies if said.start_s <= r.start_s < until]
        after = [r for r in mine if r.start_s >= said.end_s]
        during = [r for r in mine if r.start_s < said.end_s]
        reply = after[0] if after else (during[0] if during else None)
        turns.append(
            Turn(
                spoke_from_s=said.start_s,
                spoke_to_s=said.end_s,
                reply_from_s=reply.start_s if reply else None,
                reply_to_s=reply.end_s if reply else None,
                response_ms=(reply.start_s - said.end_s) * 1000 if reply else None,
                overlap=bool(reply and not after),
            )
        )
    return turns


def overlapping_replies(spoken: Sequence[Segment], replies: Sequence[Segment]) -> list[Segment]:
    """The replies that started while the person was speaking."""
    return [r for r in replies if any(s.start_s <= r.start_s < s.end_s for s in spoken)]


def analyse_turns(played: np.ndarray, received: np.ndarray, rate: int = RATE) -> TurnAnalysis:
    """Segments of both signals, the turns they make and the overlapping replies."""
    spoken = find_segments(played, rate)
    replies = find_segments(received, rate)
    return TurnAnalysis(
        spoken=tuple(spoken),
        replies=tuple(replies),
        turns=tuple(pair_turns(spoken, replies)),
        overlaps=tuple(overlapping_replies(spoken, replies)),
    )
