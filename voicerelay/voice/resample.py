"""Streaming int16 mono resampling through soxr.

soxr keeps its output aligned with its input (linear phase, no leading delay in the samples),
so what a stream costs in latency is the audio it holds back between calls. `delay_ms` is that
hold-back measured once per (in rate, out rate, quality): a scratch stream is fed 2 s of
silence in 20 ms chunks (the call path's frame), and after the first 200 ms, input duration fed
minus output duration returned is taken after every chunk: `delay_ms` is its mean,
`max_delay_ms` its peak. soxr works in blocks, so it swings from chunk to chunk: MQ at
48 <-> 24 or 16 kHz holds 21 ms on average and up to 39 ms (two 20 ms frames); LQ about 11 and
20 ms, at the price of a narrower passband (-2 dB at 0.4 of the lower rate, 6.4 kHz at 16 kHz,
where MQ is still flat); QQ (cubic, no anti-aliasing filter) holds nothing.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import soxr

QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
_PROBE_CHUNK_S = 0.02
_PROBE_CHUNKS = 100
_PROBE_WARMUP = 10


@cache
def _stream_delay_ms(in_rate: int, out_rate: int, quality: str) -> tuple[float, float]:
    """(mean, peak) ms of audio held back by a soxr stream fed 20 ms chunks (module doc)."""
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
    chunk = np.zeros(max(1, round(in_rate * _PROBE_CHUNK_S)), np.int16)
    fed = returned = 0
    lags = []
    for i in range(_PROBE_CHUNKS):
        fed += len(chunk)
        returned += len(stream.resample_chunk(chunk))
        if i >= _PROBE_WARMUP:
            lags.append(fed / in_rate - returned / out_rate)
    return 1000.0 * sum(lags) / len(lags), 1000.0 * max(lags)


class Resampler:
    """One direction of a call's audio: int16 mono at `in_rate` in, at `out_rate` out."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "MQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"resampler rates must be positive, not {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(f"resampler quality {quality!r} is unknown: use one of {QUALITIES}")
        self.in_rate, self.out_rate, self.quality = in_rate, out_rate, quality
        self._stream = self._new_stream()
        self._delay = (0.0, 0.0) if self._stream is None else _stream_delay_ms(*self._key)

    @property
    def _key(self) -> tuple[int, int, str]:
        return self.in_rate, self.out_rate, self.quality

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="int16", quality=self.quality
        )

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Resample the next chunk of the stream (equal rates: `pcm` itself, not a copy)."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"resampler takes 1-D int16 audio, not {pcm.ndim}-D {pcm.dtype}")
        if self._stream is None:
            return pcm
        return self._stream.resample_chunk(pcm)

    def flush(self) -> np.ndarray:
        """End of the stream: the audio still held back. The resampler then starts afresh."""
        if self._stream is None:
            return np.zeros(0, np.int16)
        tail = self._stream.resample_chunk(np.zeros(0, np.int16), last=True)
        self._stream = self._new_stream()
        return tail

    @property
    def delay_ms(self) -> float:
        """Mean audio held back when fed 20 ms chunks, measured once per rate pair and quality."""
        return self._delay[0]

    @property
    def max_delay_ms(self) -> float:
        """The most audio held back after any 20 ms chunk (same measurement)."""
        return self._delay[1]
