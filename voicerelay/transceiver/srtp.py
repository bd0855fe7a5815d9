"""SRTP and SRTCP for one session through pylibsrtp (both WebRTC profiles), on one of two paths.

pylibsrtp's `Session.protect`/`unprotect` allocate and type-check on every call, which costs
as much as the encryption itself. `BindingSrtp`, the hot path, calls the same libsrtp functions
through pylibsrtp's own (private) cffi binding with one buffer and one length cell per context,
reused. `PublicSrtp` uses pylibsrtp's public API only.

`srtp_context(keys)` picks the path. Whether the binding still works is checked once, at
import, by protecting and unprotecting one RTP and one RTCP packet per profile against the
public API: a pylibsrtp release that hides the binding, changes a signature or computes
something else leaves `BINDING_PROBLEM` saying why (logged once) and every call on the public
API, instead of raising on a call's first packet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import pylibsrtp

from voicerelay.transceiver.dtls import SRTP_PROFILES, SrtpKeys

try:
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib
except ImportError:  # pragma: no cover - only with a pylibsrtp whose internals moved
    _ffi = _lib = None

log = logging.getLogger(__name__)

_PROFILES = {
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}
KEY_SIZES = {name: key + salt for name, key, salt in SRTP_PROFILES.values()}  # key + salt
BUFFER_SIZE = 1500  # what pylibsrtp's own wrapper allows
RTP_TRAILER = 16 + 128  # SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN
RTCP_TRAILER = 4 + 16 + 128  # + the SRTCP index


class SrtpContext(Protocol):
    """Protect what we send and unprotect what we receive; failures are counted, not raised.

    `protect_*` raise `pylibsrtp.Error` (libsrtp refused) or `ValueError` (too long), as
    pylibsrtp does; `unprotect_*` return None for anything that does not verify and count it
    in `unprotect_failures`.
    """

    profile: str
    unprotect_failures: int

    def protect_rtp(self, packet: bytes) -> bytes: ...
    def unprotect_rtp(self, packet: bytes) -> bytes | None: ...
    def protect_rtcp(self, packet: bytes) -> bytes: ...
    def unprotect_rtcp(self, packet: bytes) -> bytes | None: ...


def _sessions(keys: SrtpKeys) -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    """The pylibsrtp sessions of one association: (outbound, inbound)."""
    profile = _PROFILES[keys.profile]
    tx = pylibsrtp.Policy(
        key=keys.local, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile
    )
    rx = pylibsrtp.Policy(
        key=keys.remote, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile
    )
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


class PublicSrtp:
    """An `SrtpContext` on pylibsrtp's public API (the fallback)."""

    def __init__(self, keys: SrtpKeys) -> None:
        self.profile = keys.profile
        self.unprotect_failures = 0
        self._tx, self._rx = _sessions(keys)

    def protect_rtp(self, packet: bytes) -> bytes:
        return self._tx.protect(packet)

    def unprotect_rtp(self, packet: bytes) -> bytes | None:
        return self._counted(self._rx.unprotect, packet)

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self._tx.protect_rtcp(packet)

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        return self._counted(self._rx.unprotect_rtcp, packet)

    def _counted(self, unprotect: Callable[[bytes], bytes], packet: bytes) -> bytes | None:
        """`unprotect(packet)`, or None (counted) if it does not verify."""
        try:
            return unprotect(packet)
        except (pylibsrtp.Error, ValueError):
            self.unprotect_failures += 1
            return None


class BindingSrtp:
    """An `SrtpContext` calling libsrtp through pylibsrtp's binding over one reused buffer.

    `binding` is `(ffi, lib)` of pylibsrtp's `_binding` (given only by `check_binding`).
    Raises whatever a changed binding raises; `srtp_context` builds one only after the check.
    """

    def __init__(self, keys: SrtpKeys, binding: tuple[Any, Any] = (_ffi, _lib)) -> None:
        ffi, lib = binding
        if lib is None:
            raise RuntimeError("pylibsrtp has no _binding module")
        self.profile = keys.profile
        self.unprotect_failures = 0
        # The pylibsrtp sessions own (and free) the libsrtp contexts we call directly.
        self._tx, self._rx = _sessions(keys)
        self._tx_srtp = self._tx._srtp[0]
        self._rx_srtp = self._rx._srtp[0]
        self._protect, self._unprotect = lib.srtp_protect, lib.srtp_unprotect
        self._protect_rtcp, self._unprotect_rtcp = lib.srtp_protect_rtcp, lib.srtp_unprotect_rtcp
        self._cdata = ffi.new("char[]", BUFFER_SIZE)
        self._buffer = ffi.buffer(self._cdata)
        self._length = ffi.new("int *")

    # RTP inlined: it is the hot path ----------------------------------------------------------
    def protect_rtp(self, packet: bytes) -> bytes:
        size = len(packet)
        if size > BUFFER_SIZE - RTP_TRAILER:
            raise ValueError("packet is too long")
        length = self._length
        self._buffer[0:size] = packet
        length[0] = size
        rc = self._protect(self._tx_srtp, self._cdata, length)
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
        if self._unprotect(self._rx_srtp, self._cdata, length):
            self.unprotect_failures += 1
            return None
        return self._buffer[0 : length[0]]

    # RTCP is rare: one generic path -----------------------------------------------------------
    def protect_rtcp(self, packet: bytes) -> bytes:
        return self._process_rtcp(packet, self._protect_rtcp, self._tx_srtp, RTCP_TRAILER)

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._process_rtcp(packet, self._unprotect_rtcp, self._rx_srtp, 0)
        except (pylibsrtp.Error, ValueError):
            self.unprotect_failures += 1
            return None

    def _process_rtcp(self, packet: bytes, func: Any, srtp: Any, trailer: int) -> bytes:
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


def _error_text(rc: int) -> str:
    errors = getattr(pylibsrtp, "ERRORS", ())
    return errors[rc] if 0 <= rc < len(errors) else f"libsrtp error {rc}"


# One RTP packet (v2, PT 111, seq 1, ts 960, SSRC 1) and one receiver report of SSRC 1.
_PROBE_RTP = bytes.fromhex("806f0001000003c000000001") + b"probe"
_PROBE_RTCP = bytes.fromhex("80c9000100000001")


def check_binding(binding: tuple[Any, Any] = (_ffi, _lib)) -> str | None:
    """None if `BindingSrtp` on `binding` interoperates with the public API both ways, for
    RTP and RTCP in every profile; else what went wrong (any error counts)."""
    try:
        for profile, size in KEY_SIZES.items():
            ours, theirs = os.urandom(size), os.urandom(size)
            fast = BindingSrtp(SrtpKeys(profile, ours, theirs), binding)
            public = PublicSrtp(SrtpKeys(profile, theirs, ours))
            for sender, receiver in ((fast, public), (public, fast)):
                if receiver.unprotect_rtp(sender.protect_rtp(_PROBE_RTP)) != _PROBE_RTP:
                    return f"{profile}: RTP does not round-trip"
                if receiver.unprotect_rtcp(sender.protect_rtcp(_PROBE_RTCP)) != _PROBE_RTCP:
                    return f"{profile}: RTCP does not round-trip"
    except Exception as exc:  # a changed binding may fail in any way
        return f"{type(exc).__name__}: {exc}"
    return None


BINDING_PROBLEM = check_binding()
if BINDING_PROBLEM is not None:  # pragma: no cover - only with a pylibsrtp whose internals moved
    log.warning("SRTP fast path off, using pylibsrtp's public API: %s", BINDING_PROBLEM)


def srtp_context(keys: SrtpKeys) -> SrtpContext:
    """The SRTP context of one association: the fast path if it passed the import check."""
    return BindingSrtp(keys) if BINDING_PROBLEM is None else PublicSrtp(keys)
