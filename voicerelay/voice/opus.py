"""Opus through libopus itself (cffi, ABI mode): decode with loss concealment and in-band FEC,
encode 20 ms mono frames for VoIP.

Why not PyAV's codec: its decoder takes an empty packet for the end of the stream, so it can do
neither packet-loss concealment nor FEC recovery; libopus does both in `opus_decode`.

libopus is found, in order: the copy PyAV's wheel bundles (`site-packages/av.libs/libopus*.so*`,
located without importing av), then the system's (`ctypes.util.find_library("opus")`). It is
loaded once, on first use; without either, `OpusUnavailable` names the fix.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
from typing import Any

import cffi
import numpy as np

_CDEF = """
typedef struct OpusDecoder OpusDecoder;
typedef struct OpusEncoder OpusEncoder;
const char *opus_get_version_string(void);
const char *opus_strerror(int error);
OpusDecoder *opus_decoder_create(int32_t Fs, int channels, int *error);
int opus_decode(OpusDecoder *st, const char *data, int32_t len, int16_t *pcm,
                int frame_size, int decode_fec);
void opus_decoder_destroy(OpusDecoder *st);
OpusEncoder *opus_encoder_create(int32_t Fs, int channels, int application, int *error);
int32_t opus_encode(OpusEncoder *st, const int16_t *pcm, int frame_size, char *data,
                    int32_t max_data_bytes);
int opus_encoder_ctl(OpusEncoder *st, int request, ...);
void opus_encoder_destroy(OpusEncoder *st);
int opus_packet_get_nb_samples(const char *packet, int32_t len, int32_t Fs);
"""
# libopus >= 1.5 only: looked up separately so an older system libopus still loads.
_CDEF_LBRR = "int opus_packet_has_lbrr(const char *packet, int32_t len);"

OPUS_OK = 0
OPUS_APPLICATION_VOIP = 2048
OPUS_SET_BITRATE = 4002
OPUS_SET_COMPLEXITY = 4010
OPUS_SET_INBAND_FEC = 4012
OPUS_SET_PACKET_LOSS_PERC = 4014
OPUS_SET_DTX = 4016
OPUS_SET_SIGNAL = 4024
OPUS_SIGNAL_VOICE = 3001

SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
MAX_PACKET_MS = 120  # the longest Opus packet
MAX_PAYLOAD = 1500  # opus_encode's output buffer; one frame is at most 1275 bytes
FIX = (
    "install PyAV (pip install av: its wheel bundles libopus) or the system library "
    "(Debian: apt-get install libopus0)"
)

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_ffi.cdef(_CDEF_LBRR)
_lib: Any = None
_has_lbrr_symbol = False


class OpusError(ValueError):
    """A packet libopus refused (corrupt, empty) or another libopus error code."""


class OpusUnavailable(RuntimeError):
    """No libopus could be loaded."""


def _candidates() -> list[str]:
    """Paths (or names) of libopus to try, best first."""
    found: list[str] = []
    spec = importlib.util.find_spec("av")
    if spec is not None and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))  # site-packages/av/__init__.py
        found += sorted(glob.glob(os.path.join(site, "av.libs", "libopus*.so*")))
    system = ctypes.util.find_library("opus")
    if system:
        found.append(system)
    return found


def _load() -> Any:
    """The libopus library object, loaded on first call."""
    global _lib, _has_lbrr_symbol
    if _lib is not None:
        return _lib
    errors = []
    for path in _candidates():
        try:
            lib = _ffi.dlopen(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        try:
            lib.opus_packet_has_lbrr  # noqa: B018 - probing for the symbol
            _has_lbrr_symbol = True
        except AttributeError:
            _has_lbrr_symbol = False
        _lib = lib
        return lib
    tried = f" (tried {'; '.join(errors)})" if errors else ""
    raise OpusUnavailable(f"libopus not found{tried}: {FIX}")


def _error_text(code: int) -> str:
    return _ffi.string(_load().opus_strerror(code)).decode("ascii", "replace")


def libopus_version() -> str:
    """libopus's version string, e.g. 'libopus 1.6.1'."""
    return _ffi.string(_load().opus_get_version_string()).decode("ascii", "replace")


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        rates = ", ".join(str(r) for r in SAMPLE_RATES)
        raise ValueError(f"Opus sample rate {sample_rate} is not supported: use one of {rates}")


class OpusDecoder:
    """One mono decoder (a stereo packet is downmixed by libopus). Not thread-safe."""

    def __init__(self, sample_rate: int = 48000) -> None:
        _check_rate(sample_rate)
        lib = _load()
        self.sample_rate = sample_rate
        self._lib = lib
        self._step = sample_rate // 400  # 2.5 ms: the granularity of Opus frame sizes
        self._max_samples = sample_rate * MAX_PACKET_MS // 1000
        err = _ffi.new("int *")
        state = lib.opus_decoder_create(sample_rate, 1, err)
        if err[0] != OPUS_OK or state == _ffi.NULL:
            raise OpusError(f"opus_decoder_create: {_error_text(err[0])}")
        self._state = _ffi.gc(state, lib.opus_decoder_destroy)
        self._pcm = _ffi.new("int16_t[]", self._max_samples)
        self._view = np.frombuffer(_ffi.buffer(self._pcm), dtype=np.int16)

    def _result(self, n: int, what: str) -> np.ndarray:
        if n < 0:
            raise OpusError(f"{what}: {_error_text(n)}")
        return self._view[:n].copy()

    def _check_samples(self, samples: int) -> None:
        if not 0 < samples <= self._max_samples or samples % self._step:
            raise ValueError(
                f"{samples} samples is not an Opus duration at {self.sample_rate} Hz: "
                f"use a multiple of {self._step} up to {self._max_samples}"
            )

    def decode(self, payload: bytes) -> np.ndarray:
        """The packet's audio (its own duration, e.g. 960 samples for 20 ms at 48 kHz)."""
        if not payload:
            raise OpusError("empty Opus packet (use conceal() for a lost one)")
        n = self._lib.opus_decode(
            self._state, payload, len(payload), self._pcm, self._max_samples, 0
        )
        return self._result(n, "corrupt Opus packet")

    def conceal(self, samples: int = 960) -> np.ndarray:
        """Packet-loss concealment: `samples` of audio standing in for a lost packet."""
        self._check_samples(samples)
        n = self._lib.opus_decode(self._state, _ffi.NULL, 0, self._pcm, samples, 0)
        return self._result(n, "Opus concealment")

    def recover(self, next_payload: bytes, samples: int = 960) -> np.ndarray:
        """The lost frame before `next_payload`, rebuilt from that packet's in-band FEC (LBRR)
        when it carries some, else concealed. A corrupt `next_payload` falls back to
        concealment too (its own decode() will raise). Decode `next_payload` itself after."""
        self._check_samples(samples)
        if not self.has_fec(next_payload):
            return self.conceal(samples)
        n = self._lib.opus_decode(
            self._state, next_payload, len(next_payload), self._pcm, samples, 1
        )
        if n < 0:
            return self.conceal(samples)
        return self._view[:n].copy()

    @staticmethod
    def has_fec(payload: bytes) -> bool:
        """True if the packet carries in-band FEC (LBRR) for the packet before it."""
        lib = _load()
        if not payload:
            return False
        if not _has_lbrr_symbol:  # libopus < 1.5: SILK and hybrid packets may carry LBRR
            return (
                lib.opus_packet_get_nb_samples(payload, len(payload), 48000) > 0
                and (payload[0] >> 3) < 16
            )
        return lib.opus_packet_has_lbrr(payload, len(payload)) > 0


class OpusEncoder:
    """A mono VoIP encoder taking exactly one 20 ms frame per call. Not thread-safe.

    With `dtx`, silent frames come out as packets of 1-2 bytes, which need not be sent.
    """

    def __init__(
        self,
        sample_rate: int = 48000,
        *,
        bitrate: int = 32000,
        complexity: int = 5,
        fec: bool = True,
        expected_loss_pct: int = 10,
        dtx: bool = False,
    ) -> None:
        _check_rate(sample_rate)
        if not 500 <= bitrate <= 512000:
            raise ValueError(f"Opus bitrate {bitrate} is out of range: use 500-512000 bit/s")
        if not 0 <= complexity <= 10:
            raise ValueError(f"Opus complexity {complexity} is out of range: use 0-10")
        if not 0 <= expected_loss_pct <= 100:
            raise ValueError(f"expected loss {expected_loss_pct}% is out of range: use 0-100")
        lib = _load()
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self._lib = lib
        err = _ffi.new("int *")
        state = lib.opus_encoder_create(sample_rate, 1, OPUS_APPLICATION_VOIP, err)
        if err[0] != OPUS_OK or state == _ffi.NULL:
            raise OpusError(f"opus_encoder_create: {_error_text(err[0])}")
        self._state = _ffi.gc(state, lib.opus_encoder_destroy)
        self._ctl(OPUS_SET_BITRATE, bitrate)
        self._ctl(OPUS_SET_COMPLEXITY, complexity)
        self._ctl(OPUS_SET_INBAND_FEC, int(fec))
        self._ctl(OPUS_SET_PACKET_LOSS_PERC, expected_loss_pct)
        self._ctl(OPUS_SET_DTX, int(dtx))
        self._ctl(OPUS_SET_SIGNAL, OPUS_SIGNAL_VOICE)
        self._pcm = _ffi.new("int16_t[]", self.frame_samples)
        self._pcm_view = np.frombuffer(_ffi.buffer(self._pcm), dtype=np.int16)
        self._out = _ffi.new("char[]", MAX_PAYLOAD)
        self._out_buffer = _ffi.buffer(self._out)

    def _ctl(self, request: int, value: int) -> None:
        code = self._lib.opus_encoder_ctl(self._state, request, _ffi.cast("int", value))
        if code != OPUS_OK:
            raise OpusError(f"opus_encoder_ctl({request}, {value}): {_error_text(code)}")

    def encode(self, pcm: np.ndarray) -> bytes:
        """One Opus packet for exactly one 20 ms frame of int16 samples."""
        if pcm.dtype != np.int16 or pcm.shape != (self.frame_samples,):
            raise ValueError(
                f"Opus encode takes one 20 ms frame: {self.frame_samples} int16 samples, "
                f"not shape {pcm.shape} of {pcm.dtype}"
            )
        self._pcm_view[:] = pcm
        n = self._lib.opus_encode(
            self._state, self._pcm, self.frame_samples, self._out, MAX_PAYLOAD
        )
        if n < 0:
            raise OpusError(f"opus_encode: {_error_text(n)}")
        return self._out_buffer[:n]
