"""VAD choice and endpointing for the decoded-audio path: webrtcvad (modes 0-3, through the
project's Endpointer) against Silero VAD (the ONNX model faster-whisper's wheel ships, run with
onnxruntime); then the Endpointer's hangover, with and without its offset detector.

Data, made here: espeak-ng sentences (three voices and speeds; 7 of the 12 with commas, i.e.
natural short pauses), each labelled from the clean signal's energy (onset to end: 10 ms
windows within 40 dB of the sentence's peak), laid out with silence gaps and mixed with noise:
white at several SNRs (speech level over noise level), and for endpointing also pink noise and
"wobbling" white noise (its level steps by up to +-6 dB every 150 ms) at 10 dB; plus noise-only
audio at the white noise levels.

Every detector is fed the same 20 ms frames at 48 kHz in real-time order:
- frame accuracy: the frame verdict against the labels (per SNR);
- on noise-only audio: false starts per minute (SpeechStarted events) and the share of frames
  called speech;
- start decision: from the true onset to the frame at which SpeechStarted fired;
- decision delay: from the true end of a sentence to the frame at which TurnEnded fired;
  `splits` counts turns ended inside a sentence (at a natural pause), `missed` sentences
  without a turn end; `tail` is how long after the true end the last voiced frame came
  (TurnEnded.speech_ended_at); `resume` how soon after a split the person went on speaking
  (SpeechStarted decision: the time the agent had before the split turned into a barge-in);
- CPU microseconds per 20 ms frame.

The design's budget: the turn-ended decision <= 250 ms after speech ends (p50, clean and down
to 10 dB SNR). The bench picks the hangover that meets it with the fewest splits and says
whether the Endpointer's default agrees.

Run: .venv/bin/python bench/vad_choice.py [--quick]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import numpy as np
import soxr

from voicerelay.voice.endpoint import DEFAULT_HANGOVER_MS, Endpointer, TurnTracker
from voicerelay.voice.events import SpeechStarted, TurnEnded
from voicerelay.voice.resample import Resampler

RATE = 48000
FRAME = 960  # 20 ms
FRAME_S = FRAME / RATE
LABEL_FLOOR_DB = 40.0
SENTENCES = (
    "Please send the report by Friday.",
    "Hello there, how are you doing today?",
    "Turn left at the next corner and stop.",
    "I would like a large coffee with milk.",
    "What time does the train leave?",
    "Seven, eight, nine, ten.",
    "Well, I think we should leave at noon.",
    "Can you book a table for two, please?",
    "My number is four, five, six, seven.",
    "The meeting moved to Tuesday afternoon.",
    "Yes, that sounds good to me.",
    "First, open the door, then turn on the lights.",
)
VOICES = (("en-us", 150), ("en-gb", 185), ("en-us+f3", 140))
QUICK_SENTENCES = 4
SNRS = (None, 20.0, 10.0, 5.0, 0.0)  # None: clean
QUICK_SNRS = (None, 10.0, 0.0)
TYPICAL_SNR_DB = 10.0  # a call after the browser's noise suppression is rarely worse
NOISE_SECONDS = 180.0
QUICK_NOISE_SECONDS = 15.0
BUDGET_MS = 250.0  # the design's endpointing budget (p50 after speech ends)
VAD_ALONE_HANGOVERS_MS = (120, 140, 160, 200)  # the sweep: the VAD's verdict alone
OFFSET_HANGOVERS_MS = (200, 220, 240, 260, 280)  # and with the offset detector
BEFORE_HANGOVER_MS = 200  # the default before the offset detector
CPU_REPEATS, CPU_REPEATS_QUICK = 7, 2
# Endpointing conditions: (name, SNR dB or None, noise kind); the first three are the budget's.
CONDITIONS = (
    ("clean", None, "white"),
    ("20 dB", 20.0, "white"),
    ("10 dB", 10.0, "white"),
    ("5 dB", 5.0, "white"),
    ("10 dB pink", 10.0, "pink"),
    ("10 dB wobbling", 10.0, "wobbling"),
)
BUDGET_CONDITIONS = ("clean", "20 dB", "10 dB")
SILERO_ON, SILERO_OFF = 0.5, 0.35  # faster-whisper's thresholds (speech on / off hysteresis)


# Data -----------------------------------------------------------------------------------------
def speak(text: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    """`text` spoken by espeak-ng, as 48 kHz int16."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("bench: espeak-ng is missing (Debian: apt-get install espeak-ng)")
    path = workdir / "utterance.wav"
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return soxr.resample(pcm, rate, RATE)


def energy_bounds(pcm: np.ndarray) -> tuple[int, int]:
    """(first, last + 1) sample of the 10 ms windows within LABEL_FLOOR_DB of the peak."""
    win = RATE // 100
    windows = pcm[: len(pcm) // win * win].astype(np.float64).reshape(-1, win)
    level = np.sqrt(np.mean(windows**2, axis=1))
    loud = np.nonzero(level > level.max() * 10 ** (-LABEL_FLOOR_DB / 20))[0]
    return int(loud[0] * win), int((loud[-1] + 1) * win)


@dataclass
class Scene:
    """Clean speech with gaps, its per-frame labels, and each sentence's (onset, end) in s."""

    pcm: np.ndarray
    labels: np.ndarray
    sentences: list[tuple[float, float]] = field(default_factory=list)

    @property
    def speech_rms(self) -> float:
        frames = self.pcm[: len(self.labels) * FRAME].reshape(-1, FRAME).astype(np.float64)
        return float(np.sqrt(np.mean(frames[self.labels] ** 2)))


def build_scene(utterances: list[np.ndarray], rng: np.random.Generator) -> Scene:
    """Sentences separated by 0.8-1.5 s of silence (1 s before the first)."""
    parts, sentences, cursor = [], [], 0
    for i, utterance in enumerate(utterances):
        gap = np.zeros(int(RATE * (1.0 if i == 0 else rng.uniform(0.8, 1.5))), np.int16)
        first, last = energy_bounds(utterance)
        sentences.append(((cursor + len(gap) + first) / RATE, (cursor + len(gap) + last) / RATE))
        parts += [gap, utterance]
        cursor += len(gap) + len(utterance)
    parts.append(np.zeros(RATE, np.int16))
    pcm = np.concatenate(parts)
    n = len(pcm) // FRAME
    centres = (np.arange(n) + 0.5) * FRAME_S
    labels = np.zeros(n, bool)
    for onset, end in sentences:
        labels |= (centres >= onset) & (centres < end)
    return Scene(pcm[: n * FRAME], labels, sentences)


def white_noise(samples: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, rms, samples)


def pink_noise(samples: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """1/f power: white noise shaped in the frequency domain, scaled to `rms`."""
    spectrum = np.fft.rfft(rng.normal(0.0, 1.0, samples))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    shaped = np.fft.irfft(spectrum, samples)
    return shaped * (rms / np.sqrt(np.mean(shaped**2)))


def wobbling_noise(samples: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """White noise whose level moves by up to +-6 dB every 150 ms (ramps), overall `rms`."""
    step = int(0.15 * RATE)
    levels_db = rng.uniform(-6.0, 6.0, samples // step + 2)
    gain = 10 ** (np.interp(np.arange(samples), np.arange(len(levels_db)) * step, levels_db) / 20)
    return rng.normal(0.0, rms, samples) * gain / np.sqrt(np.mean(gain**2))


NOISES = {"white": white_noise, "pink": pink_noise, "wobbling": wobbling_noise}


def to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(samples, -32768, 32767).astype(np.int16)


def mix(
    scene: Scene, snr_db: float | None, rng: np.random.Generator, kind: str = "white"
) -> np.ndarray:
    """The scene with `kind` noise at `snr_db` (None: as it is)."""
    if snr_db is None:
        return scene.pcm
    rms = scene.speech_rms / 10 ** (snr_db / 20)
    return to_int16(scene.pcm.astype(np.float64) + NOISES[kind](len(scene.pcm), rms, rng))


# Detectors ------------------------------------------------------------------------------------
Detector = Callable[[np.ndarray, float], tuple[bool, list]]  # Endpointer.push's shape


def silero_model_path() -> str:
    import faster_whisper

    assets = os.path.join(os.path.dirname(faster_whisper.__file__), "assets")
    found = sorted(glob.glob(os.path.join(assets, "silero_vad*.onnx")))
    if not found:
        raise SystemExit("bench: faster-whisper ships no silero_vad*.onnx (pip install '.[agent]')")
    return found[-1]


class SileroSession:
    """One onnxruntime session, single-threaded (a call gets one core's share, not a pool)."""

    def __init__(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self.path = silero_model_path()
        self.session = onnxruntime.InferenceSession(
            self.path, providers=["CPUExecutionProvider"], sess_options=options
        )


class SileroEndpointer:
    """Silero VAD fed in real time: 48 kHz frames resampled to 16 kHz, run per 512-sample
    window (32 ms) with the previous window's last 64 samples as context and the LSTM state
    carried over; each 20 ms frame takes the latest window's verdict (0.5 on, 0.35 off);
    turns through the Endpointer's own TurnTracker."""

    WINDOW, CONTEXT = 512, 64

    def __init__(
        self, model: SileroSession, *, start_ms: int = 60, hangover_ms: int = DEFAULT_HANGOVER_MS
    ):
        self.session = model.session
        self.resampler = Resampler(RATE, 16000)
        self.pending = np.zeros(0, np.float32)
        self.context = np.zeros(self.CONTEXT, np.float32)
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.speech = False
        self.turns = TurnTracker(
            start_frames=-(-start_ms // 20), hangover_frames=-(-hangover_ms // 20), frame_ms=20
        )

    def _window(self, window: np.ndarray) -> float:
        model_input = np.concatenate((self.context, window))[np.newaxis, :]
        prob, self.h, self.c = self.session.run(
            None, {"input": model_input, "h": self.h, "c": self.c}
        )
        self.context = window[-self.CONTEXT :]
        return float(prob.reshape(-1)[0])

    def push(self, pcm: np.ndarray, at: float) -> tuple[bool, list]:
        audio = self.resampler.process(pcm).astype(np.float32) / 32768.0
        self.pending = np.concatenate((self.pending, audio))
        while len(self.pending) >= self.WINDOW:
            prob = self._window(self.pending[: self.WINDOW])
            self.pending = self.pending[self.WINDOW :]
            if prob >= SILERO_ON:
                self.speech = True
            elif prob < SILERO_OFF:
                self.speech = False
        event = self.turns.push(self.speech, at)
        return self.speech, [] if event is None else [event]


class SubframeEndpointer(Endpointer):
    """The Endpointer with webrtcvad fed 10 ms halves (the frame is voiced if either is): its
    own hangover counts in 10 ms frames there. Measured, not used."""

    def _vad_verdict(self, pcm: np.ndarray, mean_square: float) -> bool:
        half = self.frame_samples // 2
        first = self._vad.is_speech(pcm[:half].tobytes(), self.sample_rate)
        second = self._vad.is_speech(pcm[half:].tobytes(), self.sample_rate)  # always: its state
        return first or second


def endpointer(hangover_ms: int, offset: bool, subframes: bool = False) -> Detector:
    """A fresh Endpointer (mode 2, defaults but the hangover), with or without offset detection."""
    ep = (SubframeEndpointer if subframes else Endpointer)(hangover_ms=hangover_ms)
    if not offset:
        ep.offset = None
    return ep.push


def vad_alone(mode: int) -> Detector:
    """webrtcvad in `mode` through the Endpointer without its offset detector."""
    ep = Endpointer(aggressiveness=mode)
    ep.offset = None
    return ep.push


def detectors(model: SileroSession | None) -> dict[str, Callable[[], Detector]]:
    """Name -> factory of a fresh detector (one per stream, as one per call): each VAD alone
    (like for like, all at the default hangover), then the Endpointer as it ships."""
    out: dict[str, Callable[[], Detector]] = {
        f"webrtcvad-{mode}": (lambda mode=mode: vad_alone(mode)) for mode in range(4)
    }
    if model is not None:
        out["silero"] = lambda: SileroEndpointer(model).push
    out["endpointer"] = lambda: Endpointer().push
    return out


# Measuring ------------------------------------------------------------------------------------
@dataclass
class Run:
    verdicts: np.ndarray
    starts: list[float]  # decision times of SpeechStarted
    ends: list[tuple[float, float]]  # TurnEnded: (decision time, speech_ended_at)
    seconds: float  # CPU-bound wall time of the feed
    frames: int


def feed(detector: Detector, pcm: np.ndarray) -> Run:
    n = len(pcm) // FRAME
    verdicts = np.zeros(n, bool)
    starts, ends = [], []
    began = time.perf_counter()
    for k in range(n):
        at = (k + 1) * FRAME_S
        voiced, events = detector(pcm[k * FRAME : (k + 1) * FRAME], at)
        verdicts[k] = voiced
        for event in events:
            if isinstance(event, SpeechStarted):
                starts.append(at)
            elif isinstance(event, TurnEnded):
                ends.append((at, event.speech_ended_at))
    return Run(verdicts, starts, ends, time.perf_counter() - began, n)


@dataclass
class Delays:
    onset_ms: list[float] = field(default_factory=list)
    endpoint_ms: list[float] = field(default_factory=list)
    tail_ms: list[float] = field(default_factory=list)
    resume_ms: list[float] = field(default_factory=list)
    splits: int = 0
    missed: int = 0
    sentences: int = 0


def turn_delays(run: Run, scene: Scene, into: Delays) -> None:
    """Per sentence: start decision after the onset, turn-end decision after the end, splits
    inside it and how soon the person went on after each."""
    bounds = [*scene.sentences, (len(scene.pcm) / RATE + 10, 0.0)]
    for (onset, end), (next_onset, _) in zip(bounds, bounds[1:], strict=False):
        into.sentences += 1
        started = [t for t in run.starts if onset - 0.1 <= t < end]
        if started:
            into.onset_ms.append(1000 * (started[0] - onset))
        for split, _ in (e for e in run.ends if onset < e[0] < end):
            into.splits += 1
            resumed = [t for t in run.starts if t > split]
            if resumed:
                into.resume_ms.append(1000 * (resumed[0] - split))
        ended = [e for e in run.ends if end <= e[0] < next_onset]
        if ended:
            into.endpoint_ms.append(1000 * (ended[0][0] - end))
            into.tail_ms.append(1000 * (ended[0][1] - end))
        else:
            into.missed += 1


def pct(values: list[float], p: float) -> float:
    return harness.percentile(values, p) if values else float("nan")


def snr_key(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g} dB"


def typical(key: str) -> bool:
    """Conditions a call usually sees: clean, or SNR >= TYPICAL_SNR_DB."""
    return key == "clean" or float(key.split()[0]) >= TYPICAL_SNR_DB


def turn_figures(delays: Delays) -> dict[str, Any]:
    return {
        "start_decision_ms_p50": pct(delays.onset_ms, 50),
        "endpoint_delay_ms_p50": pct(delays.endpoint_ms, 50),
        "endpoint_delay_ms_p90": pct(delays.endpoint_ms, 90),
        "endpoint_delay_ms_max": max(delays.endpoint_ms, default=float("nan")),
        "tail_ms_p50": pct(delays.tail_ms, 50),
        "splits": delays.splits,
        "resume_after_split_ms_p50": pct(delays.resume_ms, 50),
        "missed": delays.missed,
        "sentences": delays.sentences,
    }


def merged(parts: Iterable[Delays]) -> Delays:
    out = Delays()
    for d in parts:
        out.onset_ms += d.onset_ms
        out.endpoint_ms += d.endpoint_ms
        out.tail_ms += d.tail_ms
        out.resume_ms += d.resume_ms
        out.splits += d.splits
        out.missed += d.missed
        out.sentences += d.sentences
    return out


# The VAD comparison ---------------------------------------------------------------------------
def evaluate_one(
    make: Callable[[], Detector],
    mixes: list[tuple[str, Scene, np.ndarray]],
    noises: dict[str, np.ndarray],
    noise_seconds: float,
) -> dict[str, Any]:
    """One VAD over every mix and every noise-only clip."""
    by_snr: dict[str, dict[str, Any]] = {}
    delays: dict[str, Delays] = {}
    seconds = frames = 0.0
    for key, scene, pcm in mixes:
        run = feed(make(), pcm)
        row = by_snr.setdefault(key, {"correct": 0, "frames": 0})
        row["correct"] += int(np.sum(run.verdicts == scene.labels[: run.frames]))
        row["frames"] += run.frames
        turn_delays(run, scene, delays.setdefault(key, Delays()))
        seconds, frames = seconds + run.seconds, frames + run.frames
    for key, row in by_snr.items():
        row["frame_accuracy"] = row.pop("correct") / row.pop("frames")
        row.update(turn_figures(delays[key]))
    for key, noise in noises.items():
        run = feed(make(), noise)
        by_snr[key]["noise_false_starts_per_min"] = len(run.starts) / (noise_seconds / 60)
        by_snr[key]["noise_frames_voiced"] = float(np.mean(run.verdicts))
        seconds, frames = seconds + run.seconds, frames + run.frames
    return {
        "by_snr": by_snr,
        "typical": turn_figures(merged(d for k, d in delays.items() if typical(k))),
        "cpu_us_per_frame": 1e6 * seconds / frames,
    }


def evaluate(
    factories: dict[str, Callable[[], Detector]],
    scenes: list[Scene],
    snrs: tuple[float | None, ...],
    noise_seconds: float,
    rng: np.random.Generator,
) -> dict[str, dict[str, Any]]:
    """Name -> figures, every VAD on the same audio."""
    mixes = [(snr_key(snr), scene, mix(scene, snr, rng)) for snr in snrs for scene in scenes]
    level = scenes[0].speech_rms
    noises = {
        snr_key(snr): to_int16(
            white_noise(int(RATE * noise_seconds), level / 10 ** (snr / 20), rng)
        )
        for snr in snrs
        if snr is not None
    }
    return {
        name: evaluate_one(make, mixes, noises, noise_seconds) for name, make in factories.items()
    }


# Endpointing ----------------------------------------------------------------------------------
@dataclass
class Setting:
    """One way to endpoint: webrtcvad mode 2, a hangover, with or without offset detection."""

    hangover_ms: int
    offset: bool
    subframes: bool = False

    @property
    def name(self) -> str:
        how = "offset detector" if self.offset else "VAD alone"
        return f"{how}, 10 ms VAD frames" if self.subframes else how

    @property
    def label(self) -> str:
        return f"{self.name}, hangover {self.hangover_ms} ms"

    def make(self) -> Detector:
        return endpointer(self.hangover_ms, self.offset, self.subframes)


def endpoint_mixes(
    scenes: list[Scene], rng: np.random.Generator
) -> list[tuple[str, Scene, np.ndarray]]:
    """Every scene in every endpointing condition (one noise draw each)."""
    return [
        (name, scene, mix(scene, snr, rng, kind))
        for name, snr, kind in CONDITIONS
        for scene in scenes
    ]


def endpoint_run(setting: Setting, mixes: list[tuple[str, Scene, np.ndarray]]) -> dict[str, Any]:
    """One setting over every condition: figures per condition and over the budget's."""
    delays: dict[str, Delays] = {}
    for name, scene, pcm in mixes:
        turn_delays(feed(setting.make(), pcm), scene, delays.setdefault(name, Delays()))
    budget = merged(delays[name] for name in BUDGET_CONDITIONS)
    return {
        "hangover_ms": setting.hangover_ms,
        "offset_detector": setting.offset,
        "vad_frame_ms": 10 if setting.subframes else 20,
        "budget": turn_figures(budget),
        "worst_p50_ms": max(pct(delays[n].endpoint_ms, 50) for n in BUDGET_CONDITIONS),
        "splits_by_condition": [delays[n].splits for n in BUDGET_CONDITIONS],
        "by_condition": {name: turn_figures(d) for name, d in delays.items()},
    }


def sweep_settings(quick: bool) -> list[Setting]:
    """The hangover sweep: the VAD alone (20 and 10 ms VAD frames), then with offset detection."""
    if quick:
        return [Setting(BEFORE_HANGOVER_MS, False), Setting(DEFAULT_HANGOVER_MS, True)]
    settings = [Setting(h, False) for h in VAD_ALONE_HANGOVERS_MS]
    settings.append(Setting(BEFORE_HANGOVER_MS, False, subframes=True))
    return settings + [Setting(h, True) for h in OFFSET_HANGOVERS_MS]


def choose(sweep: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With the offset detector: the hangover whose p50 meets the budget in every budget
    condition with the fewest splits (then the shortest p50)."""
    fits = [
        r
        for r in sweep
        if r["offset_detector"] and r["vad_frame_ms"] == 20 and r["worst_p50_ms"] <= BUDGET_MS
    ]
    if not fits:
        return None
    return min(fits, key=lambda r: (r["budget"]["splits"], r["budget"]["endpoint_delay_ms_p50"]))


def cpu_per_frame(settings: list[Setting], pcm: np.ndarray, repeats: int) -> dict[str, float]:
    """Name -> microseconds of push per 20 ms frame: the best of `repeats` feeds of the same
    audio, the settings taking turns (so a busy spell on the machine hits them alike)."""
    frames = [pcm[k * FRAME : (k + 1) * FRAME] for k in range(len(pcm) // FRAME)]
    best = {s.label: float("inf") for s in settings}
    for _ in range(repeats):
        for setting in settings:
            push = setting.make()
            began = time.perf_counter()
            for k, frame in enumerate(frames):
                push(frame, k * FRAME_S)
            best[setting.label] = min(best[setting.label], time.perf_counter() - began)
    return {label: 1e6 * seconds / len(frames) for label, seconds in best.items()}


# Report ---------------------------------------------------------------------------------------
def accuracy(r: dict[str, Any], keys: list[str]) -> float:
    return float(np.mean([r["by_snr"][k]["frame_accuracy"] for k in keys]))


def verdict(results: dict[str, dict[str, Any]]) -> str:
    """The rule: Silero only if it is clearly better where calls live (clean or SNR >= 10 dB)
    and fits a call's CPU share (the design's 200 calls a core leave 100 us per 20 ms frame for
    all of decode, VAD, resampling and encode)."""
    web, silero = results["webrtcvad-2"], results.get("silero")  # both without offset detection
    if silero is None:
        return "verdict: webrtcvad mode 2 (Silero not measured: onnxruntime or model missing)"
    keys = list(web["by_snr"])
    usual = [k for k in keys if typical(k)]
    worst = keys[-1]
    gain = 100 * (accuracy(silero, usual) - accuracy(web, usual))
    choice = "Silero" if gain >= 5 and silero["cpu_us_per_frame"] <= 30 else "webrtcvad mode 2"
    return (
        f"verdict: {choice}. Clean or SNR >= {TYPICAL_SNR_DB:g} dB: Silero {gain:+.1f} points of "
        f"frame accuracy at {silero['cpu_us_per_frame']:.0f} vs {web['cpu_us_per_frame']:.0f} "
        f"us/frame, endpoint p50 {silero['typical']['endpoint_delay_ms_p50']:.0f} vs "
        f"{web['typical']['endpoint_delay_ms_p50']:.0f} ms; at {worst} webrtcvad breaks down "
        f"({web['by_snr'][worst]['frame_accuracy']:.2f} vs "
        f"{silero['by_snr'][worst]['frame_accuracy']:.2f}). Rule: Silero if >= 5 points and "
        f"<= 30 us/frame."
    )


def endpoint_verdict(
    sweep: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]
) -> str:
    chosen = choose(sweep)
    b, a = before["budget"], after["budget"]
    line = (
        f"endpointing: default hangover {DEFAULT_HANGOVER_MS} ms with the offset detector: "
        f"p50 {a['endpoint_delay_ms_p50']:.0f} / p90 {a['endpoint_delay_ms_p90']:.0f} ms after "
        f"speech ends (worst condition p50 {after['worst_p50_ms']:.0f}; budget "
        f"{BUDGET_MS:.0f}), {a['splits']} splits in {a['sentences']} sentences; before "
        f"(hangover {BEFORE_HANGOVER_MS}, VAD alone): p50 {b['endpoint_delay_ms_p50']:.0f} / "
        f"p90 {b['endpoint_delay_ms_p90']:.0f} ms, {b['splits']} splits. "
    )
    if chosen is None:
        return line + "No hangover meets the budget with the offset detector."
    agrees = "agrees" if chosen["hangover_ms"] == DEFAULT_HANGOVER_MS else "DISAGREES"
    return line + (
        f"Fewest splits within the budget: hangover {chosen['hangover_ms']} ms ({agrees} with "
        f"the default)."
    )


def tables(results: dict[str, dict[str, Any]]) -> list[str]:
    keys = list(next(iter(results.values()))["by_snr"])
    noisy = [k for k in keys if k != "clean"]
    by_snr = harness.table(
        "frame accuracy by SNR (share of 20 ms frames whose verdict matches the label)",
        ["vad", *keys],
        [[name, *(r["by_snr"][k]["frame_accuracy"] for k in keys)] for name, r in results.items()],
    )
    noise = harness.table(
        "noise only, at each SNR's noise level: false starts per minute / share of frames voiced",
        ["vad", *noisy],
        [
            [
                name,
                *(
                    f"{r['by_snr'][k]['noise_false_starts_per_min']:.1f} / "
                    f"{r['by_snr'][k]['noise_frames_voiced']:.2f}"
                    for k in noisy
                ),
            ]
            for name, r in results.items()
        ],
    )
    headers = ["start p50 ms", "endpoint p50 ms", "p90 ms", "max ms", "splits", "missed"]
    fields = ["start_decision_ms_p50", "endpoint_delay_ms_p50", "endpoint_delay_ms_p90"]
    fields += ["endpoint_delay_ms_max", "splits", "missed"]
    turns = harness.table(
        f"turns, clean and SNR >= {TYPICAL_SNR_DB:g} dB (start 60 ms, hangover "
        f"{DEFAULT_HANGOVER_MS} ms; each VAD alone, then the Endpointer with its offset "
        f"detector), and CPU",
        ["vad", *headers, "cpu us/frame"],
        [
            [name, *(r["typical"][f] for f in fields), r["cpu_us_per_frame"]]
            for name, r in results.items()
        ],
    )
    return [by_snr, noise, turns]


def endpoint_tables(
    sweep: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any], cpu: dict
) -> list[str]:
    sentences = sweep[0]["budget"]["sentences"]
    rows = [
        [
            r["hangover_ms"],
            ("offset detector" if r["offset_detector"] else "VAD alone")
            + (", 10 ms VAD frames" if r["vad_frame_ms"] == 10 else ""),
            *(_short(r["budget"][f]) for f in ("endpoint_delay_ms_p50", "endpoint_delay_ms_p90")),
            _short(r["worst_p50_ms"]),
            _short(r["budget"]["tail_ms_p50"]),
            "/".join(str(n) for n in r["splits_by_condition"]),
            *(
                _short(r["budget"][f])
                for f in ("resume_after_split_ms_p50", "start_decision_ms_p50")
            ),
        ]
        for r in sweep
    ]
    hangover = harness.table(
        f"endpointing (webrtcvad mode 2), clean + 20 dB + 10 dB white noise, {sentences} "
        f"sentences: decision delay after the true end (budget p50 <= {BUDGET_MS:.0f} ms) "
        f"against splits at natural pauses",
        [
            "hangover ms",
            "how",
            "p50 ms",
            "p90 ms",
            "worst p50",
            "tail p50",
            "splits c/20/10",
            "resume p50",
            "start p50",
        ],
        rows,
    )
    by_condition = harness.table(
        f"by condition: before (hangover {BEFORE_HANGOVER_MS} ms, VAD alone) -> defaults "
        f"(hangover {DEFAULT_HANGOVER_MS} ms, offset detector); the budget covers clean..10 dB",
        ["condition", "p50 ms", "p90 ms", "tail p50", "splits", "missed", "start p50"],
        [
            [name, *(_arrow(before, after, name, f) for f in CONDITION_FIELDS)]
            for name in after["by_condition"]
        ],
    )
    cpu_table = harness.table(
        "CPU per 20 ms frame (Endpointer.push, best of several feeds of the same 10 dB audio)",
        ["how", "us/frame"],
        [[name, us] for name, us in cpu.items()],
    )
    return [hangover, by_condition, cpu_table]


CONDITION_FIELDS = (
    "endpoint_delay_ms_p50",
    "endpoint_delay_ms_p90",
    "tail_ms_p50",
    "splits",
    "missed",
    "start_decision_ms_p50",
)


def _arrow(before: dict[str, Any], after: dict[str, Any], name: str, field_name: str) -> str:
    old, new = before["by_condition"][name][field_name], after["by_condition"][name][field_name]
    return f"{_short(old)} -> {_short(new)}"


def _short(value: float | int) -> str:
    """Whole milliseconds ("-": no sample)."""
    return "-" if value != value else str(round(value))


def no_nan(value: Any) -> Any:
    """NaN (no sample) as null: the JSON stays standard."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def make_scenes(sentences: tuple[str, ...], rng: np.random.Generator) -> list[Scene]:
    with tempfile.TemporaryDirectory() as tmp:
        return [
            build_scene([speak(s, voice, speed, Path(tmp)) for s in sentences], rng)
            for voice, speed in VOICES
        ]


def endpointing(
    scenes: list[Scene], quick: bool, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, float]]:
    """The hangover sweep, before/after by condition, and CPU."""
    mixes = endpoint_mixes(scenes, rng)
    sweep = [endpoint_run(s, mixes) for s in sweep_settings(quick)]
    runs = {(r["hangover_ms"], r["offset_detector"], r["vad_frame_ms"]): r for r in sweep}
    before = runs.get((BEFORE_HANGOVER_MS, False, 20)) or endpoint_run(
        Setting(BEFORE_HANGOVER_MS, False), mixes
    )
    after = runs.get((DEFAULT_HANGOVER_MS, True, 20)) or endpoint_run(
        Setting(DEFAULT_HANGOVER_MS, True), mixes
    )
    cpu_audio = next(pcm for name, _, pcm in mixes if name == "10 dB")
    compared = [
        Setting(BEFORE_HANGOVER_MS, False),
        Setting(DEFAULT_HANGOVER_MS, True),
        Setting(BEFORE_HANGOVER_MS, False, subframes=True),
    ]
    cpu = cpu_per_frame(compared, cpu_audio, CPU_REPEATS_QUICK if quick else CPU_REPEATS)
    return sweep, before, after, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sentences, SNRs and hangovers")
    args = p.parse_args()
    info = harness.machine()
    rng = np.random.default_rng(7)
    sentences = SENTENCES[:QUICK_SENTENCES] if args.quick else SENTENCES
    snrs = QUICK_SNRS if args.quick else SNRS
    scenes = make_scenes(sentences, rng)
    try:
        model: SileroSession | None = SileroSession()
    except (ImportError, SystemExit) as exc:
        print(f"Silero skipped: {exc}")
        model = None
    noise_seconds = QUICK_NOISE_SECONDS if args.quick else NOISE_SECONDS
    results = evaluate(detectors(model), scenes, snrs, noise_seconds, rng)
    sweep, before, after, cpu = endpointing(scenes, args.quick, rng)
    lines = [verdict(results), endpoint_verdict(sweep, before, after)]
    figures = {
        "quick": args.quick,
        "sentences": len(sentences) * len(VOICES),
        "snrs_db": [s for s in snrs if s is not None],
        "noise_seconds": noise_seconds,
        "silero_model": None if model is None else os.path.basename(model.path),
        "vads": results,
        "endpointing": {
            "default_hangover_ms": DEFAULT_HANGOVER_MS,
            "budget_ms": BUDGET_MS,
            "sweep": sweep,
            "before": before,
            "after": after,
            "chosen_hangover_ms": (choose(sweep) or {}).get("hangover_ms"),
            "cpu_us_per_frame": cpu,
        },
        "verdict": lines,
    }
    all_tables = tables(results) + endpoint_tables(sweep, before, after, cpu)
    harness.report("vad_choice", all_tables, no_nan(figures), info)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
