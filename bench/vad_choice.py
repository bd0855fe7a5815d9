"""VAD choice for the decoded-audio path: webrtcvad (modes 0-3, through the project's Endpointer)
against Silero VAD (the ONNX model faster-whisper's wheel ships, run with onnxruntime).

Data, made here: espeak-ng sentences (two voices and speeds), each labelled from the clean
signal's energy (onset to end: 10 ms windows within 40 dB of the sentence's peak), laid out with
silence gaps and mixed with white noise at several SNRs (speech level over noise level); plus
noise-only audio at the same noise levels.

Per VAD, every detector fed the same 20 ms frames at 48 kHz in real-time order:
- frame accuracy: the frame verdict against the labels (all SNRs, and per SNR);
- on noise-only audio: false starts per minute (SpeechStarted events) and the share of frames
  called speech;
- speech-start decision delay: from the true onset to the frame at which SpeechStarted fired;
- endpoint delay: from the true end of a sentence to the frame at which TurnEnded fired, with the
  Endpointer's defaults (start 60 ms, hangover 200 ms; Silero through the same TurnTracker);
  `splits` counts turns ended inside a sentence, `missed` sentences without a turn end;
- CPU microseconds per 20 ms frame (time.perf_counter around the whole feed, Silero's 48 -> 16
  kHz resampling and window batching included).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import numpy as np
import soxr

from voicerelay.voice.endpoint import Endpointer, TurnTracker
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
)
VOICES = (("en-us", 150), ("en-gb", 185))
SNRS = (None, 20.0, 10.0, 5.0, 0.0)  # None: clean
QUICK_SNRS = (None, 10.0, 0.0)
TYPICAL_SNR_DB = 10.0  # a call after the browser's noise suppression is rarely worse
NOISE_SECONDS = 180.0
QUICK_NOISE_SECONDS = 15.0
HANGOVERS_MS = (100, 120, 150, 200)  # the webrtcvad sweep of endpoint delay against splits
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


def mix(scene: Scene, snr_db: float | None, rng: np.random.Generator) -> np.ndarray:
    if snr_db is None:
        return scene.pcm
    rms = scene.speech_rms / 10 ** (snr_db / 20)
    noisy = scene.pcm.astype(np.float64) + white_noise(len(scene.pcm), rms, rng)
    return np.clip(noisy, -32768, 32767).astype(np.int16)


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

    def __init__(self, model: SileroSession, *, start_ms: int = 60, hangover_ms: int = 200):
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


def detectors(model: SileroSession | None) -> dict[str, Callable[[], Detector]]:
    """Name -> factory of a fresh detector (one per stream, as one per call)."""
    out: dict[str, Callable[[], Detector]] = {
        f"webrtcvad-{mode}": (lambda mode=mode: Endpointer(aggressiveness=mode).push)
        for mode in range(4)
    }
    if model is not None:
        out["silero"] = lambda: SileroEndpointer(model).push
    return out


# Measuring ------------------------------------------------------------------------------------
@dataclass
class Run:
    verdicts: np.ndarray
    starts: list[float]  # decision times of SpeechStarted
    ends: list[float]  # decision times of TurnEnded
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
                ends.append(at)
    return Run(verdicts, starts, ends, time.perf_counter() - began, n)


@dataclass
class Delays:
    onset_ms: list[float] = field(default_factory=list)
    endpoint_ms: list[float] = field(default_factory=list)
    splits: int = 0
    missed: int = 0


def turn_delays(run: Run, scene: Scene, into: Delays) -> None:
    """Per sentence: start decision after the onset, turn-end decision after the end."""
    bounds = [*scene.sentences, (len(scene.pcm) / RATE + 10, 0.0)]
    for (onset, end), (next_onset, _) in zip(bounds, bounds[1:], strict=False):
        started = [t for t in run.starts if onset - 0.1 <= t < end]
        if started:
            into.onset_ms.append(1000 * (started[0] - onset))
        into.splits += sum(1 for t in run.ends if onset < t < end)
        ended = [t for t in run.ends if end <= t < next_onset]
        if ended:
            into.endpoint_ms.append(1000 * (ended[0] - end))
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
        "splits": delays.splits,
        "missed": delays.missed,
    }


def evaluate_one(
    make: Callable[[], Detector],
    mixes: list[tuple[str, Scene, np.ndarray]],
    noises: dict[str, np.ndarray],
    noise_seconds: float,
) -> dict[str, Any]:
    """One VAD over every mix and every noise-only clip."""
    by_snr: dict[str, dict[str, Any]] = {}
    delays: dict[str, Delays] = {}
    typical_delays = Delays()
    seconds = frames = 0.0
    for key, scene, pcm in mixes:
        run = feed(make(), pcm)
        row = by_snr.setdefault(key, {"correct": 0, "frames": 0})
        row["correct"] += int(np.sum(run.verdicts == scene.labels[: run.frames]))
        row["frames"] += run.frames
        turn_delays(run, scene, delays.setdefault(key, Delays()))
        if typical(key):
            turn_delays(run, scene, typical_delays)
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
        "typical": turn_figures(typical_delays),
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
        snr_key(snr): np.clip(
            white_noise(int(RATE * noise_seconds), level / 10 ** (snr / 20), rng), -32768, 32767
        ).astype(np.int16)
        for snr in snrs
        if snr is not None
    }
    return {
        name: evaluate_one(make, mixes, noises, noise_seconds) for name, make in factories.items()
    }


def hangover_sweep(
    scenes: list[Scene], snr: float | None, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """webrtcvad mode 2: endpoint delay against turns split inside a sentence."""
    rows = []
    mixes = [(scene, mix(scene, snr, rng)) for scene in scenes]
    for hangover in HANGOVERS_MS:
        delays = Delays()
        for scene, pcm in mixes:
            turn_delays(
                feed(Endpointer(aggressiveness=2, hangover_ms=hangover).push, pcm), scene, delays
            )
        rows.append({"hangover_ms": hangover, **turn_figures(delays)})
    return rows


# Report ---------------------------------------------------------------------------------------
def accuracy(r: dict[str, Any], keys: list[str]) -> float:
    return float(np.mean([r["by_snr"][k]["frame_accuracy"] for k in keys]))


def verdict(results: dict[str, dict[str, Any]]) -> str:
    """The rule: Silero only if it is clearly better where calls live (clean or SNR >= 10 dB)
    and fits a call's CPU share (the design's 200 calls a core leave 100 us per 20 ms frame for
    all of decode, VAD, resampling and encode)."""
    web, silero = results["webrtcvad-2"], results.get("silero")
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


def tables(results: dict[str, dict[str, Any]], sweep: list[dict[str, Any]]) -> list[str]:
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
        f"turns, clean and SNR >= {TYPICAL_SNR_DB:g} dB (start 60 ms, hangover 200 ms), and CPU",
        ["vad", *headers, "cpu us/frame"],
        [
            [name, *(r["typical"][f] for f in fields), r["cpu_us_per_frame"]]
            for name, r in results.items()
        ],
    )
    hangover = harness.table(
        f"webrtcvad mode 2 at {TYPICAL_SNR_DB:g} dB SNR: hangover against endpoint delay",
        ["hangover ms", *headers],
        [[r["hangover_ms"], *(r[f] for f in fields)] for r in sweep],
    )
    return [by_snr, noise, turns, hangover]


def no_nan(value: Any) -> Any:
    """NaN (no sample) as null: the JSON stays standard."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sentences and SNRs")
    args = p.parse_args()
    info = harness.machine()
    rng = np.random.default_rng(7)
    sentences = SENTENCES[:3] if args.quick else SENTENCES
    snrs = QUICK_SNRS if args.quick else SNRS
    with tempfile.TemporaryDirectory() as tmp:
        scenes = []
        for voice, speed in VOICES:
            utterances = [speak(s, voice, speed, Path(tmp)) for s in sentences]
            scenes.append(build_scene(utterances, rng))
    try:
        model: SileroSession | None = SileroSession()
    except (ImportError, SystemExit) as exc:
        print(f"Silero skipped: {exc}")
        model = None
    noise_seconds = QUICK_NOISE_SECONDS if args.quick else NOISE_SECONDS
    results = evaluate(detectors(model), scenes, snrs, noise_seconds, rng)
    sweep = hangover_sweep(scenes, TYPICAL_SNR_DB, rng)
    line = verdict(results)
    figures = {
        "quick": args.quick,
        "sentences": len(sentences) * len(VOICES),
        "snrs_db": [s for s in snrs if s is not None],
        "noise_seconds": noise_seconds,
        "silero_model": None if model is None else os.path.basename(model.path),
        "vads": results,
        "hangover_sweep": sweep,
        "verdict": line,
    }
    harness.report("vad_choice", tables(results, sweep), no_nan(figures), info)
    print(line)


if __name__ == "__main__":
    main()
