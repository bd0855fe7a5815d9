"""Streaming resampling: frequency kept, lengths exact over many chunks, clipping safe."""

from __future__ import annotations

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.voice.resample import Resampler

PAIRS = [
    (48000, 16000),
    (16000, 48000),
    (48000, 24000),
    (24000, 48000),
    (48000, 8000),
    (8000, 48000),
]


def tone(freq: float, rate: int, seconds: float, amplitude: float = 12000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate / len(pcm))


def stream(r: Resampler, pcm: np.ndarray, chunk: int) -> np.ndarray:
    parts = [r.process(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk)]
    return np.concatenate([*parts, r.flush()])


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
def test_a_tone_keeps_its_frequency_and_level(in_rate: int, out_rate: int) -> None:
    r = Resampler(in_rate, out_rate)
    out = stream(r, tone(440, in_rate, 1.0), in_rate // 50)
    assert out.dtype == np.int16
    assert len(out) == out_rate
    assert peak_hz(out, out_rate) == pytest.approx(440, abs=2)
    middle = out[out_rate // 10 : -out_rate // 10].astype(np.float64)
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(12000 / np.sqrt(2), rel=0.02)


def test_content_above_the_new_nyquist_is_filtered_out() -> None:
    out = stream(Resampler(48000, 16000), tone(11000, 48000, 0.5), 960)
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) < 100  # no alias at 5 kHz


@settings(max_examples=60, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    chunks=st.lists(st.integers(0, 2500), min_size=1, max_size=40),
)
def test_total_length_follows_the_ratio_over_any_chunking(
    pair: tuple[int, int], chunks: list[int]
) -> None:
    in_rate, out_rate = pair
    r = Resampler(in_rate, out_rate)
    total = sum(len(r.process(np.ones(n, np.int16))) for n in chunks) + len(r.flush())
    assert abs(total - sum(chunks) * out_rate / in_rate) <= 1


def test_full_scale_input_clips_instead_of_wrapping() -> None:
    square = np.where((np.arange(24000) // 12) % 2, 32767, -32768).astype(np.int16)
    out = stream(Resampler(24000, 48000), square, 480)
    reference = soxr.resample(square.astype(np.float64), 24000, 48000, quality="MQ")
    assert np.abs(reference).max() > 32767  # the filter overshoots full scale...
    expected = np.clip(reference, -32768, 32767)
    assert np.abs(out.astype(np.float64) - expected).max() < 64  # ...and int16 out clips it


def test_same_rate_passes_audio_through_without_copying() -> None:
    r = Resampler(48000, 48000)
    pcm = tone(300, 48000, 0.02)
    assert r.process(pcm) is pcm
    assert len(r.flush()) == 0
    assert r.delay_ms == r.max_delay_ms == 0.0


def test_delay_is_measured_and_plausible() -> None:
    mq, lq = Resampler(48000, 24000, "MQ"), Resampler(48000, 24000, "LQ")
    assert 5 < mq.delay_ms < mq.max_delay_ms < 45
    assert 0 < lq.delay_ms < mq.delay_ms
    # the figure matches what a real stream holds back when fed 20 ms chunks
    r = Resampler(48000, 24000)
    fed = out = 0
    lags = []
    for _ in range(100):
        fed += 960
        out += len(r.process(np.zeros(960, np.int16)))
        lags.append(fed / 48000 - out / 24000)
    assert np.mean(lags[10:]) * 1000 == pytest.approx(mq.delay_ms, abs=3)
    assert max(lags[10:]) * 1000 == pytest.approx(mq.max_delay_ms, abs=3)


def test_flush_then_the_stream_starts_again() -> None:
    r = Resampler(16000, 48000)
    first = stream(r, tone(500, 16000, 0.2), 320)
    second = stream(r, tone(500, 16000, 0.2), 320)
    assert len(first) == len(second) == 9600
    assert np.abs(first.astype(np.int32) - second).max() <= 2  # int16 output is dithered


def test_bad_input_is_a_value_error() -> None:
    r = Resampler(48000, 16000)
    with pytest.raises(ValueError):
        r.process(np.zeros(960, np.float32))
    with pytest.raises(ValueError):
        r.process(np.zeros((960, 1), np.int16))
    with pytest.raises(ValueError):
        Resampler(48000, 16000, "best")
    with pytest.raises(ValueError):
        Resampler(0, 16000)
