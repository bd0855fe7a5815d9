"""Endpointing on real speech (espeak-ng) and noise, and the turn state machine's properties."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.voice.endpoint import Endpointer, TurnTracker
from voicerelay.voice.events import SpeechStarted, TurnEnded

RATE, FRAME = 48000, 960


def espeak(text: str, path: Path, *, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng: mono int16 at 48 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return soxr.resample(pcm, rate, RATE)


def speech_bounds(pcm: np.ndarray, floor_db: float = 40) -> tuple[float, float]:
    """Where the clean signal's 10 ms energy is within `floor_db` of its peak: (start, end) s."""
    win = RATE // 100
    windows = pcm[: len(pcm) // win * win].astype(np.float64).reshape(-1, win)
    level = np.sqrt(np.mean(windows**2, axis=1))
    loud = np.nonzero(level > level.max() * 10 ** (-floor_db / 20))[0]
    return loud[0] * win / RATE, (loud[-1] + 1) * win / RATE


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), np.int16)


def noise(seconds: float, rms: float, seed: int = 0) -> np.ndarray:
    samples = np.random.default_rng(seed).normal(0, rms, int(RATE * seconds))
    return np.clip(samples, -32768, 32767).astype(np.int16)


def run(endpointer: Endpointer, pcm: np.ndarray) -> tuple[list[bool], list]:
    """Feed 20 ms frames; frame k arrives (ends) at (k + 1) * 20 ms."""
    verdicts, events = [], []
    for k in range(len(pcm) // FRAME):
        voiced, out = endpointer.push(pcm[k * FRAME : (k + 1) * FRAME], (k + 1) * 0.02)
        verdicts.append(voiced)
        events += out
    return verdicts, events


@pytest.fixture(scope="module")
def sentence(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return espeak("Please send the report by Friday.", tmp_path_factory.mktemp("ep") / "a.wav")


@pytest.mark.parametrize("floor_rms", [0, 30])  # digital silence, and a quiet noise floor
def test_one_turn_with_accurate_boundaries(sentence: np.ndarray, floor_rms: float) -> None:
    pcm = np.concatenate([silence(1.0), sentence, silence(1.0)])
    pcm = (pcm + noise(len(pcm) / RATE, floor_rms)).astype(np.int16) if floor_rms else pcm
    onset, end = speech_bounds(np.concatenate([silence(1.0), sentence]))
    ep = Endpointer()
    _, events = run(ep, pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    started, ended = events
    assert abs(started.at - onset) <= 0.1
    # webrtcvad's own hangover (<= 100 ms in mode 2 at 20 ms frames) plus a frame of rounding
    # puts the last voiced frame up to 120-130 ms after the energy end, never before it
    assert -0.02 <= ended.speech_ended_at - end <= 0.14
    assert ended.at - ended.speech_ended_at <= 0.2 + 0.06
    assert ended.at - ended.speech_ended_at == pytest.approx(0.2)
    assert (
        0.7 * (end - onset) * 1000 <= ended.speech_ms <= (ended.speech_ended_at - onset) * 1000 + 20
    )
    assert ep.counters["turns"] == 1 and not ep.speaking


def test_two_sentences_with_a_long_pause_are_two_turns(
    sentence: np.ndarray, tmp_path: Path
) -> None:
    second = espeak("Thank you very much.", tmp_path / "b.wav", voice="en-gb", speed=170)
    pcm = np.concatenate([silence(0.5), sentence, silence(0.8), second, silence(0.8)])
    _, events = run(Endpointer(), pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded] * 2
    assert events[1].at < events[2].at  # the first turn ended before the second began


@pytest.mark.parametrize("rms", [30, 100, 300])  # up to -40 dBFS
@pytest.mark.parametrize("lead_s", [0.0, 1.0])  # noise from the first frame, or after silence
def test_quiet_steady_white_noise_is_no_turn(rms: float, lead_s: float) -> None:
    for seed in range(3):
        pcm = np.concatenate([silence(lead_s), noise(10, rms, seed)])
        verdicts, events = run(Endpointer(aggressiveness=2), pcm)
        assert events == []
        assert not any(verdicts)


@pytest.mark.parametrize("rms", [1000, 2000])  # -30 and -24 dBFS
def test_loud_steady_white_noise_rarely_starts_a_turn(rms: float) -> None:
    """Louder white noise makes webrtcvad (mode 2) start a false turn about once a minute;
    from about -21 dBFS (rms 3000) on, it calls white noise speech throughout."""
    verdicts, events = run(Endpointer(aggressiveness=2), noise(60, rms, seed=4))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(starts) <= 3
    assert np.mean(verdicts) < 0.01


def test_without_warm_up_a_noise_onset_reads_as_speech() -> None:
    """Why the warm-up exists: webrtcvad calls its first frames of noise speech."""
    _, events = run(Endpointer(warmup_ms=0), noise(2, 300))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    assert events[1].speech_ms <= 140


def test_speech_from_the_first_frame_still_starts_on_time(sentence: np.ndarray) -> None:
    pcm = np.concatenate([sentence, silence(1.0)])
    onset, _ = speech_bounds(pcm)
    _, events = run(Endpointer(), pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    assert abs(events[0].at - onset) <= 0.1


def test_min_rms_gates_quiet_frames(sentence: np.ndarray) -> None:
    quiet = np.concatenate([silence(0.5), (sentence // 64).astype(np.int16), silence(0.5)])
    assert any(run(Endpointer(), quiet)[0])
    verdicts, events = run(Endpointer(min_rms=200), quiet)
    assert not any(verdicts) and events == []


def test_bad_settings_and_frames_are_value_errors() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        Endpointer(sample_rate=44100)
    with pytest.raises(ValueError, match="frame"):
        Endpointer(frame_ms=25)
    with pytest.raises(ValueError, match="aggressiveness"):
        Endpointer(aggressiveness=4)
    ep = Endpointer(sample_rate=16000, frame_ms=10)
    assert ep.push(np.zeros(160, np.int16), 0.01) == (False, [])
    for bad in (np.zeros(161, np.int16), np.zeros(160, np.float32), np.zeros((160, 1), np.int16)):
        with pytest.raises(ValueError):
            ep.push(bad, 0.02)


# The state machine -----------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(
    verdicts=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=200),
    start_frames=st.integers(1, 5),
    hangover_frames=st.integers(1, 12),
)
def test_turns_follow_the_verdicts(
    verdicts: list[tuple[bool, bool]], start_frames: int, hangover_frames: int
) -> None:
    tracker = TurnTracker(start_frames=start_frames, hangover_frames=hangover_frames, frame_ms=20)
    history: list[bool] = []
    started_index = None
    for k, (voiced, can_start) in enumerate(verdicts):
        at = (k + 1) * 0.02
        was_speaking = tracker.speaking
        event = tracker.push(voiced, at, can_start=can_start)
        history.append(voiced)
        run_length = next((i for i, v in enumerate(reversed(history)) if not v), len(history))
        if isinstance(event, SpeechStarted):
            assert not was_speaking and voiced and can_start and tracker.speaking
            assert run_length >= start_frames
            assert event.at == pytest.approx((k + 2 - run_length) * 0.02)
            started_index = k + 1 - run_length
        elif isinstance(event, TurnEnded):
            assert was_speaking and not voiced and not tracker.speaking
            last_voiced = max(i for i, v in enumerate(history) if v)
            assert k - last_voiced == hangover_frames  # the first frame that completes it
            assert event.speech_ended_at == pytest.approx((last_voiced + 1) * 0.02)
            assert started_index is not None
            assert event.speech_ms == 20 * sum(history[started_index:])
            assert event.at == at
        elif was_speaking:  # still speaking: the silence is shorter than the hangover
            assert tracker.speaking and True in history[-hangover_frames:]
        else:  # still idle: no long enough voiced run that may start
            assert not tracker.speaking
            assert not (voiced and can_start and run_length >= start_frames)
