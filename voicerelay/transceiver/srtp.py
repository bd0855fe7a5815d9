"""SRTP and SRTCP for one session through pylibsrtp (both WebRTC profiles)."""

from __future__ import annotations

import pylibsrtp

from voicerelay.transceiver.dtls import SrtpKeys

_PROFILES = {
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}


class SrtpContext:
    """Protect what we send and unprotect what we receive; failures are counted, not raised."""

    def __init__(self, keys: SrtpKeys) -> None:
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

    def protect_rtp(self, packet: bytes) -> bytes:
        return self._tx.protect(packet)

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self._tx.protect_rtcp(packet)

    def unprotect_rtp(self, packet: bytes) -> bytes | None:
        try:
            return self._rx.unprotect(packet)
        except pylibsrtp.Error:
            self.unprotect_failures += 1
            return None

    def unprotect_rtcp(self, packet: bytes) -> bytes | None:
        try:
            return self._rx.unprotect_rtcp(packet)
        except pylibsrtp.Error:
            self.unprotect_failures += 1
            return None
