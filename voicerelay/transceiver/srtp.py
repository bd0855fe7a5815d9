"""SRTP and SRTCP for one session through pylibsrtp (both WebRTC profiles).

pylibsrtp's `Session.protect`/`unprotect` allocate and type-check on every call, which costs
as much as the encryption itself. On the hot path we call the same libsrtp functions through
pylibsrtp's own cffi binding with one buffer and one length cell per context, reused. If a
pylibsrtp release hides those internals, the context falls back to the public methods.
"""

from __future__ import annotations

from typing import Any

import pylibsrtp

from voicerelay.transceiver.dtls import SrtpKeys

try:
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib
except ImportError:  # pragma: no cover - only with a pylibsrtp whose internals moved
    _ffi = _lib = None

_PROFILES = {
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}
BUFFER_SIZE = 1500  # what pylibsrtp's own wrapper allows
RTP_TRAILER = 16 + 128  # SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN
RTCP_TRAILER = 4 + 16 + 128  # + the SRTCP index


def _session_pointer(session: pylibsrtp.Session) -> Any:
    """The `srtp_t` behind a pylibsrtp session, or None if this pylibsrtp hides it."""
    if _lib is None:
        return None
    cell = getattr(session, "_srtp", None)
    return None if cell is None else cell[0]


class SrtpContext:
    """Protect what we send and unprotect what we receive; failures are counted, not raised.

    `protect_*` raise `pylibsrtp.Error` (libsrtp refused) or `ValueError` (too long), as
    pylibsrtp does; `unprotect_*` return None for anything that does not verify.
    """

    def __init__(self, keys: SrtpKeys, *, use_binding: bool = True) -> None:
        profile = _PROFILES[keys.profile]
        self.profile = keys.profile
        self._tx = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=keys.local, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile
            )
        )
        self._rx = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=keys.remote, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile
            )
        )
        self.unprotect_failures = 0
        # The pylibsrtp sessions above own (and free) these libsrtp contexts.
        self._tx_srtp = _session_pointer(self._tx) if use_binding else None
        self._rx_srtp = _session_pointer(self._rx) if use_binding else None
        if self._tx_srtp is None or self._rx_srtp is None:
            self._use_public_api()
            return
        self._cdata = _ffi.new("char[]", BUFFER_SIZE)
        self._buffer = _ffi.buffer(self._cdata)
        self._length = _ffi.new("int *")

    @property
    def uses_binding(self) -> bool:
        """True when the hot path calls libsrtp through the reused buffer."""
        return "protect_rtp" not in self.__dict__

    # Through pylibsrtp's binding, one buffer reused (RTP inlined: it is the hot path) --------
    def protect_rtp(self, packet: bytes) -> bytes:
        size = len(packet)
        if size > BUFFER_SIZE - RTP_TRAILER:
            raise ValueError("packet is too long")
        length = self._length
        self._buffer[0:size] = packet
        length[0] = size
        rc = _lib.srtp_protect(self._tx_srtp, self._cdata, length)
        if rc:
            raise pylibsrtp.Error(_error_text(rc))
        return self._buffer[0 : length[0]]

    def unprotect_rtp(self, packet: bytes) -> bytes | None:
        size = len(packet)
        if size > BUFFER_SIZE:
            self.unprotect_failures += 1
            return None
        length = self._length
        self._buffer[0:size] = packet
        length[0] = size
        if _lib.srtp_unprotect(self._rx_srtp, self._cdata, length):
            self.unprotect_failures += 1
            return None
        return self._buffer[0 : length[0]]

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self._process_rtcp(packet, _lib.srtp_protect_rtcp, self._tx_srtp, RTCP_TRAILER)

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._process_rtcp(packet, _lib.srtp_unprotect_rtcp, self._rx_srtp, 0)
        except (pylibsrtp.Error, ValueError):
            self.unprotect_failures += 1
            return None

    def _process_rtcp(self, packet: bytes, func: Any, srtp: Any, trailer: int) -> bytes:
        """One libsrtp call over the reused buffer (RTCP is rare: one generic path)."""
        size = len(packet)
        if size > BUFFER_SIZE - trailer:
            raise ValueError("packet is too long")
        length = self._length
        self._buffer[0:size] = packet
        length[0] = size
        rc = func(srtp, self._cdata, length)
        if rc:
            raise pylibsrtp.Error(_error_text(rc))
        return self._buffer[0 : length[0]]

    # Through pylibsrtp's public API (fallback) ------------------------------------------------
    def _use_public_api(self) -> None:
        self.protect_rtp = self._tx.protect  # type: ignore[method-assign]
        self.protect_rtcp = self._tx.protect_rtcp  # type: ignore[method-assign]
        self.unprotect_rtp = self._public_unprotect_rtp  # type: ignore[method-assign]
        self.unprotect_rtcp = self._public_unprotect_rtcp  # type: ignore[method-assign]

    def _public_unprotect_rtp(self, packet: bytes) -> bytes | None:
        try:
            return self._rx.unprotect(packet)
        except (pylibsrtp.Error, ValueError):
            self.unprotect_failures += 1
            return None

    def _public_unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._rx.unprotect_rtcp(packet)
        except (pylibsrtp.Error, ValueError):
            self.unprotect_failures += 1
            return None


def _error_text(rc: int) -> str:
    errors = getattr(pylibsrtp, "ERRORS", ())
    return errors[rc] if 0 <= rc < len(errors) else f"libsrtp error {rc}"
