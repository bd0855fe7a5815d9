"""Endpointing on real speech (espeak-ng) and noise; the turn state machine's and the offset
detector's properties."""

from __future__ import annotations

import copy
import shutil
import statistics
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.voice.endpoint import (
    DEFAULT_HANGOVER_MS,
    SILENCE_DB,
    Endpointer,
    OffsetDetector,
    TurnTracker,
)
from voicerelay.voice.events import SpeechStarted, TurnEnded

RATE, FRAME = 48000, 960
HANGOVER_S = DEFAULT_HANGOVER_MS / 1000
BUDGET_S = 0.25  # the design's endpointing budget: turn ended <= 250 ms after speech ends
SENTENCES = (
    "Please send the report by Friday.",
    "What time does the train leave?",
    "I would like a large coffee with milk.",
)
HALVES = (("Please send the report", "to me by Friday."), ("I would like a coffee", "with milk."))


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


def trimmed(pcm: np.ndarray) -> np.ndarray:
    """Only the speech (espeak pads it with silence)."""
    start, end = speech_bounds(pcm)
    return pcm[round(start * RATE) : round(end * RATE)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), np.int16)


def noise(seconds: float, rms: float, seed: int = 0, *, samples: int | None = None) -> np.ndarray:
    count = int(RATE * seconds) if samples is None else samples
    drawn = np.random.default_rng(seed).normal(0, rms, count)
    return np.clip(drawn, -32768, 32767).astype(np.int16)


def with_noise(
    pcm: np.ndarray, speech: np.ndarray, snr_db: float | None, seed: int = 0
) -> np.ndarray:
    """`pcm` plus white noise `snr_db` under the level of `speech` (None: as it is)."""
    if snr_db is None:
        return pcm
    rms = float(np.sqrt(np.mean(trimmed(speech).astype(np.float64) ** 2)))
    hiss = noise(0, rms / 10 ** (snr_db / 20), seed, samples=len(pcm))
    mixed = pcm.astype(np.float64) + hiss
    return np.clip(mixed, -32768, 32767).astype(np.int16)


def run(endpointer: Endpointer, pcm: np.ndarray) -> tuple[list[bool], list, list[float]]:
    """Feed 20 ms frames; frame k arrives (ends) at (k + 1) * 20 ms. Returns the verdicts, the
    events and when each event was decided (the arrival of the frame that gave it)."""
    verdicts, events, decided = [], [], []
    for k in range(len(pcm) // FRAME):
        at = (k + 1) * 0.02
        voiced, out = endpointer.push(pcm[k * FRAME : (k + 1) * FRAME], at)
        verdicts.append(voiced)
        events += out
        decided += [at] * len(out)
    return verdicts, events, decided


@pytest.fixture(scope="module")
def sentence(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return espeak(SENTENCES[0], tmp_path_factory.mktemp("ep") / "a.wav")


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    folder = tmp_path_factory.mktemp("eps")
    return [espeak(text, folder / f"{i}.wav") for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, np.ndarray]]:
    folder = tmp_path_factory.mktemp("eph")
    return [
        (trimmed(espeak(a, folder / f"{i}a.wav")), trimmed(espeak(b, folder / f"{i}b.wav")))
        for i, (a, b) in enumerate(HALVES)
    ]


@pytest.mark.parametrize("floor_rms", [0, 30])  # digital silence, and a quiet noise floor
def test_one_turn_with_accurate_boundaries(sentence: np.ndarray, floor_rms: float) -> None:
    pcm = np.concatenate([silence(1.0), sentence, silence(1.0)])
    pcm = (pcm + noise(len(pcm) / RATE, floor_rms)).astype(np.int16) if floor_rms else pcm
    onset, end = speech_bounds(np.concatenate([silence(1.0), sentence]))
    ep = Endpointer()
    _, events, decided = run(ep, pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    started, ended = events
    assert abs(started.at - onset) <= 0.1
    assert decided[0] - onset <= 0.1  # start_ms (60) after the first voiced frame
    # the last voiced frame is the one holding the end of speech (it arrives up to a frame
    # later), not webrtcvad's own hangover 60-120 ms on
    assert 0 <= ended.speech_ended_at - end <= 0.03
    assert ended.at - ended.speech_ended_at == pytest.approx(HANGOVER_S)
    assert ended.at - end <= BUDGET_S
    assert (
        0.7 * (end - onset) * 1000 <= ended.speech_ms <= (ended.speech_ended_at - onset) * 1000 + 20
    )
    assert ep.counters["turns"] == 1 and not ep.speaking
    assert ep.counters["energy_unvoiced"] >= 3  # webrtcvad's tail, overruled


def test_without_offset_detection_webrtcvad_s_own_hangover_makes_it_late(
    sentence: np.ndarray,
) -> None:
    """Why the offset detector exists: the VAD alone calls 60-140 ms after the end voiced."""
    pcm = np.concatenate([silence(1.0), sentence, silence(1.0)])
    _, end = speech_bounds(pcm)
    ep = Endpointer()
    ep.offset = None
    _, events, _ = run(ep, pcm)
    ended = events[-1]
    assert isinstance(ended, TurnEnded)
    assert 0.06 <= ended.speech_ended_at - end <= 0.14
    assert ended.at - end > BUDGET_S
    assert ep.counters["energy_unvoiced"] == ep.counters["energy_voiced"] == 0


@pytest.mark.parametrize("snr_db", [None, 20.0, 10.0])
def test_turn_end_is_decided_within_the_budget_in_quiet_and_noise(
    sentences: list[np.ndarray], snr_db: float | None
) -> None:
    """Decision after the true end of speech: p50 <= 250 ms, none more than a frame over.
    Speech starts are decided as before: once 60 ms of voiced audio came in (the barge-in
    budget needs it), and at most 160 ms after the (soft: -40 dB) onset."""
    ends = []
    for seed in range(2):
        for said in sentences:
            clean = np.concatenate([silence(1.0), said, silence(1.0)])
            onset, end = speech_bounds(np.concatenate([silence(1.0), said]))
            _, events, decided = run(Endpointer(), with_noise(clean, said, snr_db, seed))
            assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
            started, ended = events
            waited = decided[0] - (started.at - 0.02)  # audio since the first voiced frame began
            if snr_db is None:  # after digital silence the VAD's warm-up runs on the speech
                assert 0.06 - 1e-9 <= waited <= 0.14 + 1e-9
            else:
                assert waited == pytest.approx(0.06)
            assert decided[0] - onset <= 0.16
            ends.append(ended.at - end)
    assert statistics.median(ends) <= BUDGET_S
    assert max(ends) <= BUDGET_S + 0.02
    assert min(ends) >= 0.1  # no turn ended while speaking


@pytest.mark.parametrize("snr_db", [None, 20.0, 10.0])
@pytest.mark.parametrize(("pause_s", "turns"), [(0.15, 1), (0.45, 2)])
def test_a_short_pause_inside_a_sentence_does_not_end_the_turn(
    halves: list[tuple[np.ndarray, np.ndarray]], snr_db: float | None, pause_s: float, turns: int
) -> None:
    """A 150 ms pause between two halves of a sentence keeps one turn; 450 ms (more than the
    hangover after the real end) makes two, the first ended within the budget."""
    for seed, (first, second) in enumerate(halves):
        clean = np.concatenate([silence(0.5), first, silence(pause_s), second, silence(0.8)])
        _, events, _ = run(Endpointer(), with_noise(clean, first, snr_db, seed))
        ended = [e for e in events if isinstance(e, TurnEnded)]
        assert len(ended) == turns
        if turns == 2:
            assert ended[0].at - (0.5 + len(first) / RATE) <= BUDGET_S + 0.02


def test_a_comma_pause_does_not_end_the_turn(tmp_path: Path) -> None:
    """espeak-ng pauses ~200 ms at a comma (at 150 words a minute)."""
    said = espeak("Hello there, how are you doing today?", tmp_path / "c.wav")
    for snr_db in (None, 20.0):
        clean = np.concatenate([silence(0.5), said, silence(0.8)])
        _, events, _ = run(Endpointer(), with_noise(clean, said, snr_db))
        assert [type(e) for e in events] == [SpeechStarted, TurnEnded]


def test_two_sentences_with_a_long_pause_are_two_turns(
    sentence: np.ndarray, tmp_path: Path
) -> None:
    second = espeak("Thank you very much.", tmp_path / "b.wav", voice="en-gb", speed=170)
    pcm = np.concatenate([silence(0.5), sentence, silence(0.8), second, silence(0.8)])
    _, events, _ = run(Endpointer(), pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded] * 2
    assert events[1].at < events[2].at  # the first turn ended before the second began


@pytest.mark.parametrize("rms", [30, 100, 300])  # up to -40 dBFS
@pytest.mark.parametrize("lead_s", [0.0, 1.0])  # noise from the first frame, or after silence
def test_quiet_steady_white_noise_is_no_turn(rms: float, lead_s: float) -> None:
    for seed in range(3):
        pcm = np.concatenate([silence(lead_s), noise(10, rms, seed)])
        verdicts, events, _ = run(Endpointer(aggressiveness=2), pcm)
        assert events == []
        assert not any(verdicts)


@pytest.mark.parametrize("rms", [1000, 2000])  # -30 and -24 dBFS
def test_loud_steady_white_noise_rarely_starts_a_turn(rms: float) -> None:
    """Louder white noise makes webrtcvad (mode 2) start a false turn about once a minute;
    from about -21 dBFS (rms 3000) on, it calls white noise speech throughout."""
    verdicts, events, _ = run(Endpointer(aggressiveness=2), noise(60, rms, seed=4))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(starts) <= 3
    assert np.mean(verdicts) < 0.01


def test_without_warm_up_a_noise_onset_reads_as_speech() -> None:
    """Why the warm-up exists: webrtcvad calls its first frames of noise speech."""
    _, events, _ = run(Endpointer(warmup_ms=0), noise(2, 300))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    assert events[1].speech_ms <= 140


def test_speech_from_the_first_frame_still_starts_on_time(sentence: np.ndarray) -> None:
    pcm = np.concatenate([sentence, silence(1.0)])
    onset, _ = speech_bounds(pcm)
    _, events, _ = run(Endpointer(), pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    assert abs(events[0].at - onset) <= 0.1


def test_min_rms_gates_quiet_frames(sentence: np.ndarray) -> None:
    quiet = np.concatenate([silence(0.5), (sentence // 64).astype(np.int16), silence(0.5)])
    assert any(run(Endpointer(), quiet)[0])
    verdicts, events, _ = run(Endpointer(min_rms=200), quiet)
    assert not any(verdicts) and events == []


def test_bad_settings_and_frames_are_value_errors() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        Endpointer(sample_rate=44100)
    with pytest.raises(ValueError, match="frame"):
        Endpointer(frame_ms=25)
    with pytest.raises(ValueError, match="aggressiveness"):
        Endpointer(aggressiveness=4)
    with pytest.raises(ValueError, match="noise_rate"):
        OffsetDetector(noise_rate=0)
    with pytest.raises(ValueError, match="margins"):
        OffsetDetector(clear_db=-1)
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


# The offset detector ---------------------------------------------------------------------------
energies = st.floats(0.0, 91.0)  # dB re 1 LSB^2: digital silence .. a full-scale square wave
frames = st.lists(st.tuples(energies, st.booleans(), st.booleans()), max_size=150)


def _thresholds(d: OffsetDetector) -> tuple[float, float] | None:
    """(unvoiced under, voiced from) while speaking; None where energy is no guide."""
    ceiling, level = d.noise_ceiling_db, d.level_db
    if ceiling is None or level is None or level - ceiling < d.min_snr_db:
        return None
    quiet = max(ceiling, level - d.range_db, SILENCE_DB)
    return quiet, max(ceiling + d.clear_db, quiet)


@settings(max_examples=300, deadline=None)
@given(frames=frames)
def test_offset_detector_overrules_only_while_speaking_and_only_clear_cases(
    frames: list[tuple[float, bool, bool]],
) -> None:
    d = OffsetDetector()
    for energy, vad, speaking in frames:
        bounds = _thresholds(d)
        verdict = d.judge(energy, vad, speaking)
        if not speaking or bounds is None:
            assert verdict == vad
        elif energy < bounds[0]:
            assert verdict is False
        elif energy >= bounds[1]:
            assert verdict is True
        else:
            assert verdict == vad
        assert d.deviation_db >= 0
    unvoiced = [e for e, vad, _ in frames if not vad]
    if unvoiced:  # the noise mean stays among the energies it learnt from
        assert min(unvoiced) - 1e-9 <= d.noise_db <= max(unvoiced) + 1e-9
    else:
        assert d.noise_db is None and d.noise_ceiling_db is None


@settings(max_examples=300, deadline=None)
@given(frames=frames, low=energies, high=energies, vad=st.booleans())
def test_offset_detector_verdict_grows_with_energy(
    frames: list[tuple[float, bool, bool]], low: float, high: float, vad: bool
) -> None:
    d = OffsetDetector()
    for energy, voiced, speaking in frames:
        d.judge(energy, voiced, speaking)
    low, high = sorted((low, high))
    quieter, louder = copy.deepcopy(d), copy.deepcopy(d)
    assert quieter.judge(low, vad, True) <= louder.judge(high, vad, True)


@settings(max_examples=100, deadline=None)
@given(noise_db=st.floats(0.0, 60.0), speech_over_noise=st.floats(15.0, 30.0))
def test_offset_detector_learns_steady_noise_and_the_speech_level(
    noise_db: float, speech_over_noise: float
) -> None:
    d = OffsetDetector()
    for _ in range(100):
        assert d.judge(noise_db, False, False) is False
    assert d.noise_db == pytest.approx(noise_db)
    assert d.noise_ceiling_db == pytest.approx(noise_db + d.margin_db)
    level = noise_db + speech_over_noise
    assert d.judge(level, True, False) is True
    assert d.level_db == pytest.approx(level)
    assert d.judge(noise_db, True, True) is False  # the VAD's tail: sounds like the noise
    assert d.judge(level - 3, True, True) is True
    clear = max(noise_db + d.margin_db + d.clear_db, SILENCE_DB, level - d.range_db)
    assert d.judge(clear + 0.1, False, True) is True  # a word's first frame the VAD missed
    assert d.level_db == pytest.approx(level, abs=0.1)  # noise-like voiced frames left it
