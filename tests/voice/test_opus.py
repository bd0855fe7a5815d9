"""libopus through cffi: round trips of speech, concealment, FEC recovery, hostile packets."""

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

from voicerelay.voice.opus import (
    OpusDecoder,
    OpusEncoder,
    OpusError,
    libopus_version,
)

RATE = 48000
FRAME = 960


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


def frames_of(pcm: np.ndarray) -> list[np.ndarray]:
    return [pcm[i : i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = tmp_path_factory.mktemp("opus") / "speech.wav"
    return espeak("The quick brown fox jumps over the lazy dog, twice a day.", path)


@pytest.fixture(scope="module")
def packets(speech: np.ndarray) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(f) for f in frames_of(speech)]


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(best normalised correlation over lags up to 20 ms, SNR in dB at that lag): the codec
    delays its output by a few milliseconds."""
    best = (-1.0, 0.0)
    for lag in range(FRAME):
        a = reference[: len(reference) - lag].astype(np.float64)
        b = decoded[lag : lag + len(a)].astype(np.float64)
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        if c > best[0]:
            best = (c, float(10 * np.log10(np.sum(a**2) / (np.sum((a - b) ** 2) + 1e-9))))
    return best


def test_version_names_libopus() -> None:
    assert libopus_version().startswith("libopus ")


def test_speech_round_trip(speech: np.ndarray, packets: list[bytes]) -> None:
    decoder = OpusDecoder()
    decoded = [decoder.decode(p) for p in packets]
    assert all(d.dtype == np.int16 and d.shape == (FRAME,) for d in decoded)
    correlation, snr = aligned_correlation(speech[: len(packets) * FRAME], np.concatenate(decoded))
    assert correlation > 0.9
    assert snr > 7.0


def test_tone_round_trip_and_fresh_arrays() -> None:
    t = np.arange(RATE) / RATE
    tone = (8000 * np.sin(2 * np.pi * 300 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(
        np.int16
    )
    encoder, decoder = OpusEncoder(), OpusDecoder()
    decoded = [decoder.decode(encoder.encode(f)) for f in frames_of(tone)]
    assert not np.shares_memory(decoded[0], decoded[1])  # the caller may keep each result
    correlation, snr = aligned_correlation(tone, np.concatenate(decoded))
    assert correlation > 0.95
    assert snr > 10.0


def test_decoder_at_another_rate(packets: list[bytes]) -> None:
    decoder = OpusDecoder(16000)
    assert decoder.decode(packets[10]).shape == (320,)
    assert decoder.conceal(320).shape == (320,)


def test_concealment_and_recovery_lengths(packets: list[bytes]) -> None:
    decoder = OpusDecoder()
    decoder.decode(packets[0])
    assert decoder.conceal().shape == (FRAME,)
    assert decoder.conceal(480).shape == (480,)
    assert decoder.recover(packets[2]).shape == (FRAME,)
    assert decoder.recover(b"\xff\x00garbage").shape == (FRAME,)  # falls back to concealment
    for bad in (0, -960, 100, 48000):
        with pytest.raises(ValueError):
            decoder.conceal(bad)


def test_speech_packets_carry_fec(packets: list[bytes]) -> None:
    assert sum(OpusDecoder.has_fec(p) for p in packets) > len(packets) * 0.5
    plain = OpusEncoder(fec=False)
    assert not any(
        OpusDecoder.has_fec(plain.encode(f)) for f in frames_of(np.zeros(RATE, np.int16))
    )
    assert not OpusDecoder.has_fec(b"")


def test_fec_recovers_a_lost_speech_frame_better_than_concealment(packets: list[bytes]) -> None:
    reference = OpusDecoder()
    clean = [reference.decode(p) for p in packets]
    loud = [k for k in range(3, len(packets) - 1) if rms(clean[k]) > 1000]
    assert len(loud) > 20
    fec_err = plc_err = signal = 0.0
    wins = 0
    for k in loud:
        with_fec, with_plc = OpusDecoder(), OpusDecoder()
        for p in packets[k - 3 : k]:  # a few packets of history, then packet k is lost
            with_fec.decode(p)
            with_plc.decode(p)
        target = clean[k].astype(np.float64)
        e_fec = float(np.sum((with_fec.recover(packets[k + 1]) - target) ** 2))
        e_plc = float(np.sum((with_plc.conceal() - target) ** 2))
        fec_err, plc_err, signal = fec_err + e_fec, plc_err + e_plc, signal + np.sum(target**2)
        wins += e_fec < e_plc
    assert wins > 0.8 * len(loud)
    assert 10 * np.log10(signal / fec_err) > 10 * np.log10(signal / plc_err) + 3


def test_empty_and_corrupt_packets_raise_opus_error() -> None:
    decoder = OpusDecoder()
    with pytest.raises(OpusError, match="empty"):
        decoder.decode(b"")
    with pytest.raises(OpusError, match="corrupt"):
        decoder.decode(b"\xff\xff\xff")
    assert issubclass(OpusError, ValueError)


def _damaged(packet: bytes, cut: int, flips: list[int]) -> bytes:
    data = bytearray(packet[: max(1, len(packet) - cut)])
    for bit in flips:
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=1500),
        st.builds(
            _damaged,
            st.sampled_from([b"\x78" + bytes(range(60)), b"\x08" + bytes(40), b"\xfc\xff\xfe"]),
            st.integers(0, 30),
            st.lists(st.integers(0, 8 * 64), max_size=6),
        ),
    )
)
def test_arbitrary_bytes_decode_or_raise_opus_error_only(data: bytes) -> None:
    decoder = OpusDecoder()
    try:
        pcm = decoder.decode(data)
    except OpusError:
        pass
    else:
        assert pcm.dtype == np.int16 and pcm.ndim == 1 and len(pcm) <= RATE * 120 // 1000
    assert isinstance(OpusDecoder.has_fec(data), bool)
    assert decoder.recover(data).shape == (FRAME,)
    assert decoder.conceal().shape == (FRAME,)  # the decoder is still usable


def test_encoder_rejects_wrong_frames() -> None:
    encoder = OpusEncoder()
    for bad in (
        np.zeros(959, np.int16),
        np.zeros(961, np.int16),
        np.zeros(FRAME, np.float32),
        np.zeros((FRAME, 1), np.int16),
        np.zeros(FRAME, np.int32),
    ):
        with pytest.raises(ValueError):
            encoder.encode(bad)
    assert OpusEncoder(16000).encode(np.zeros(320, np.int16))


def test_bad_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        OpusDecoder(44100)
    with pytest.raises(ValueError, match="sample rate"):
        OpusEncoder(22050)
    with pytest.raises(ValueError, match="complexity"):
        OpusEncoder(complexity=11)
    with pytest.raises(ValueError, match="bitrate"):
        OpusEncoder(bitrate=10)


def test_dtx_shrinks_silence() -> None:
    encoder = OpusEncoder(dtx=True)
    sizes = [len(encoder.encode(np.zeros(FRAME, np.int16))) for _ in range(50)]
    assert min(sizes) <= 2
    assert len(OpusEncoder().encode(np.zeros(FRAME, np.int16))) > 0
