"""Speech recognition for the reference agent: Whisper tiny.en (faster-whisper) vs pocketsphinx.

Each engine hears the same espeak-ng utterances: six sentences, each in two voices and speeds,
made the way the agent makes speech (24 kHz) and brought to 16 kHz the way the agent does. The
figures are word accuracy (1 - word error rate over all utterances; lower case, punctuation
dropped) and CPU seconds per second of audio (process CPU time around each decode, after one
warm-up decode; one ASR thread, the process pinned to one core). pocketsphinx uses the en-US
model its wheel bundles; if it is not installed it is skipped (`pip install pocketsphinx`).
Benchmarks print figures; nothing here passes or fails.

    .venv/bin/python bench/asr_choice.py            # 12 utterances (~15 s)
    .venv/bin/python bench/asr_choice.py --quick    # 6 utterances
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import harness
import numpy as np

from voicerelay.agent.asr import ASR_RATE, Transcriber, to_asr_rate
from voicerelay.agent.tts import Speaker
from voicerelay.voice.realtime import REALTIME_RATE

SENTENCES = (
    "hello world. what is the weather today",
    "please call me back tomorrow morning",
    "the quick brown fox jumps over the lazy dog",
    "can you book a table for dinner tonight",
    "turn off the lights in the kitchen",
    "I would like to speak with a real person",
)
VOICES = (("en-us", 160), ("en-gb", 200))  # (espeak-ng voice, words per minute)
Recognize = Callable[[np.ndarray], str]  # int16 mono 16 kHz -> text


@dataclass(frozen=True)
class Clip:
    text: str
    voice: str
    wpm: int
    pcm16k: np.ndarray

    @property
    def seconds(self) -> float:
        return self.pcm16k.size / ASR_RATE


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def make_clips(sentences: Sequence[str]) -> list[Clip]:
    clips = []
    for voice, wpm in VOICES:
        speaker = Speaker(voice, wpm)
        for text in sentences:
            pcm = to_asr_rate(speaker.synthesize_sync(text), REALTIME_RATE)
            clips.append(Clip(text, voice, wpm, pcm))
    return clips


# Engines ---------------------------------------------------------------------------------------
def whisper() -> Recognize:
    return Transcriber(threads=1).transcribe


def pocketsphinx() -> Recognize | None:
    try:
        from pocketsphinx import Decoder
    except ImportError:
        return None
    decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")

    def recognize(pcm16k: np.ndarray) -> str:
        decoder.start_utt()
        decoder.process_raw(pcm16k.astype("<i2").tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    return recognize


ENGINES: tuple[tuple[str, Callable[[], Recognize | None], str], ...] = (
    ("whisper tiny.en", whisper, "pip install 'voicerelay[agent]'"),
    ("pocketsphinx", pocketsphinx, "pip install pocketsphinx"),
)


def measure(name: str, recognize: Recognize, clips: Sequence[Clip]) -> dict[str, Any]:
    recognize(clips[0].pcm16k)  # warm-up: first-call allocations are not per-utterance cost
    rows, edits, ref_words, cpu, wall = [], 0, 0, 0.0, 0.0
    for clip in clips:
        c0, w0 = time.process_time(), time.monotonic()
        heard = recognize(clip.pcm16k)
        c, w = time.process_time() - c0, time.monotonic() - w0
        ref = words(clip.text)
        e = edit_distance(ref, words(heard))
        rows.append(
            {
                "voice": f"{clip.voice}@{clip.wpm}",
                "said": clip.text,
                "heard": heard,
                "errors": e,
                "words": len(ref),
                "cpu_s": c,
                "audio_s": clip.seconds,
            }
        )
        edits, ref_words, cpu, wall = edits + e, ref_words + len(ref), cpu + c, wall + w
    audio = sum(clip.seconds for clip in clips)
    return {
        "engine": name,
        "utterances": rows,
        "word_error_rate": edits / ref_words,
        "word_accuracy": 1 - edits / ref_words,
        "cpu_s": cpu,
        "wall_s": wall,
        "audio_s": audio,
        "cpu_per_audio_s": cpu / audio,
    }


def verdict(results: Sequence[dict[str, Any]]) -> str:
    best = max(results, key=lambda r: (round(r["word_accuracy"], 2), -r["cpu_per_audio_s"]))
    parts = [
        f"{r['engine']} {r['word_accuracy']:.0%} of words at {r['cpu_per_audio_s']:.3f} CPU s "
        "per audio s"
        for r in results
    ]
    return f"verdict: {best['engine']} ({'; '.join(parts)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three sentences instead of six")
    args = p.parse_args()
    info = harness.machine()
    core = harness.cores()[1]
    harness.pin(os.getpid(), core)
    clips = make_clips(SENTENCES[:3] if args.quick else SENTENCES)
    results, skipped = [], {}
    for name, load, hint in ENGINES:
        started = time.monotonic()
        recognize = load()
        if recognize is None:
            print(f"{name}: not installed ({hint}): skipped", flush=True)
            skipped[name] = f"not installed ({hint})"
            continue
        result = measure(name, recognize, clips)
        result["load_s"] = time.monotonic() - started - result["wall_s"]
        results.append(result)
    summary = harness.table(
        f"speech recognition on {len(clips)} espeak-ng utterances "
        f"({sum(c.seconds for c in clips):.1f} s of audio, voices "
        f"{', '.join(f'{v}@{w} wpm' for v, w in VOICES)})",
        ["engine", "word accuracy", "WER", "CPU s / audio s", "CPU s", "load s"],
        [
            [
                r["engine"],
                f"{r['word_accuracy']:.1%}",
                f"{r['word_error_rate']:.1%}",
                r["cpu_per_audio_s"],
                r["cpu_s"],
                r["load_s"],
            ]
            for r in results
        ],
    )
    detail = harness.table(
        "what each engine heard",
        ["engine", "voice", "errors/words", "heard"],
        [
            [r["engine"], u["voice"], f"{u['errors']}/{u['words']}", u["heard"][:60]]
            for r in results
            for u in r["utterances"]
        ],
    )
    figures = {
        "parameters": {
            "sentences": len(clips) // len(VOICES),
            "voices": VOICES,
            "quick": args.quick,
            "pinned_core": core,
        },
        "engines": {r["engine"]: r for r in results},
        "skipped": skipped,
        "verdict": verdict(results) if results else "no engine available",
    }
    harness.report("asr_choice", [summary, detail], figures, info)
    print(figures["verdict"])


if __name__ == "__main__":
    main()
