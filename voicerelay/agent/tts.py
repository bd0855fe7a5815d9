"""Speech synthesis for the reference agent: espeak-ng in a subprocess, resampled to 24 kHz."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import wave

import numpy as np
import soxr

from voicerelay.voice.realtime import REALTIME_RATE

ESPEAK = "espeak-ng"
INSTALL_HINT = "apt-get install espeak-ng (or make install-system)"
MAX_TEXT = 4000  # characters; a longer reply is cut (espeak takes the text as one argument)


class TtsUnavailable(RuntimeError):
    """espeak-ng is not on PATH (str: one line naming the fix)."""


class TtsError(RuntimeError):
    """espeak-ng failed on this text or voice (str: one line, espeak's own words)."""


def wav_to_pcm(data: bytes, rate: int = REALTIME_RATE) -> np.ndarray:
    """A mono 16-bit WAV (espeak's streamed header included) -> int16 mono at `rate`."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise TtsError("espeak-ng wrote audio that is not 16-bit mono")
            source_rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise TtsError(f"espeak-ng wrote no usable WAV: {exc}") from None
    pcm = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.int16)
    if source_rate == rate or pcm.size == 0:
        return pcm
    return soxr.resample(pcm, source_rate, rate, quality="HQ")


class Speaker:
    """Text -> int16 mono 24 kHz speech with one espeak-ng voice and speed."""

    def __init__(self, voice: str = "en-us", words_per_minute: int = 160) -> None:
        binary = shutil.which(ESPEAK)
        if binary is None:
            raise TtsUnavailable(f"{ESPEAK} is not installed: {INSTALL_HINT}")
        self.binary = binary
        self.voice = voice
        self.words_per_minute = words_per_minute

    def command(self, text: str) -> list[str]:
        """The espeak-ng command line for `text` (WAV on stdout; `--` keeps '-' text literal)."""
        text = " ".join(text.split())[:MAX_TEXT]
        return [
            self.binary,
            "-v",
            self.voice,
            "-s",
            str(self.words_per_minute),
            "--stdout",
            "--",
            text,
        ]

    async def synthesize(self, text: str) -> np.ndarray:
        """Speak `text`: int16 mono at 24 kHz. Raises TtsError if espeak-ng fails."""
        proc = await asyncio.create_subprocess_exec(
            *self.command(text), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return self._result(proc.returncode, out, err)

    def synthesize_sync(self, text: str) -> np.ndarray:
        """The same, blocking (tests, benchmarks, start-up checks)."""
        done = subprocess.run(self.command(text), capture_output=True, check=False)
        return self._result(done.returncode, done.stdout, done.stderr)

    def _result(self, returncode: int | None, out: bytes, err: bytes) -> np.ndarray:
        if returncode != 0:
            reason = err.decode(errors="replace").strip().splitlines()
            raise TtsError(
                f"{ESPEAK} -v {self.voice} failed ({returncode}): "
                f"{reason[-1] if reason else 'no message'}"
            )
        return wav_to_pcm(out)
