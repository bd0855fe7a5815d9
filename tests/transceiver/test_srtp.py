"""The two SRTP paths: the reused-buffer path through pylibsrtp's binding reads and writes what
the public API does, the import-time check keeps a broken binding off the hot path, and the
factory picks the binding while it works."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pylibsrtp._binding import ffi, lib

from voicerelay.transceiver import srtp
from voicerelay.transceiver.dtls import SrtpKeys
from voicerelay.transceiver.rtp import (
    RtpPacket,
    build_receiver_report,
    build_sender_report,
)
from voicerelay.transceiver.srtp import (
    BUFFER_SIZE,
    KEY_SIZES,
    BindingSrtp,
    PublicSrtp,
    check_binding,
    srtp_context,
)

PATHS = {"binding": BindingSrtp, "public": PublicSrtp}


def pair_of_contexts(profile: str, sender: str, receiver: str) -> tuple:
    """Two ends of one SRTP association, each on the path named."""
    a, b = os.urandom(KEY_SIZES[profile]), os.urandom(KEY_SIZES[profile])
    return PATHS[sender](SrtpKeys(profile, a, b)), PATHS[receiver](SrtpKeys(profile, b, a))


def test_the_binding_path_is_in_use():
    # Fails when a pylibsrtp upgrade hides or changes what the hot path needs.
    assert srtp.BINDING_PROBLEM is None, srtp.BINDING_PROBLEM
    keys = SrtpKeys("AEAD_AES_128_GCM", os.urandom(28), os.urandom(28))
    assert isinstance(srtp_context(keys), BindingSrtp)


def test_without_a_working_binding_the_factory_takes_the_public_api(monkeypatch):
    monkeypatch.setattr(srtp, "BINDING_PROBLEM", "TypeError: changed")
    keys = SrtpKeys("AEAD_AES_128_GCM", os.urandom(28), os.urandom(28))
    assert isinstance(srtp_context(keys), PublicSrtp)


def with_functions(**replaced) -> SimpleNamespace:
    """pylibsrtp's binding with some libsrtp functions as a future release might bind them."""
    names = ("srtp_protect", "srtp_unprotect", "srtp_protect_rtcp", "srtp_unprotect_rtcp")
    return SimpleNamespace(**{**{name: getattr(lib, name) for name in names}, **replaced})


@pytest.mark.parametrize(
    ("binding", "problem"),
    [
        ((ffi, None), "RuntimeError: pylibsrtp has no _binding module"),
        # a changed signature: what cffi raises on the first packet
        ((ffi, with_functions(srtp_protect=lambda srtp, buffer: 0)), "TypeError"),
        # claims success but leaves the packet as it was
        ((ffi, with_functions(srtp_protect=lambda srtp, buffer, length: 0)), "does not round"),
        ((ffi, with_functions(srtp_unprotect_rtcp=lambda srtp, buffer, length: 7)), "RTCP"),
    ],
)
def test_the_check_reports_any_broken_binding(binding, problem):
    assert check_binding((ffi, lib)) is None
    found = check_binding(binding)
    assert found is not None and problem in found


@pytest.mark.parametrize("profile", list(KEY_SIZES))
@pytest.mark.parametrize(("sender", "receiver"), [("binding", "public"), ("public", "binding")])
@settings(max_examples=20, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_each_path_reads_what_the_other_writes(profile, sender, receiver, payloads):
    ours, theirs = pair_of_contexts(profile, sender, receiver)
    for seq, payload in enumerate(payloads):
        rtp = RtpPacket(111, seq, seq * 960, 1234, payload).serialize()
        protected = ours.protect_rtp(rtp)
        assert protected != rtp and isinstance(protected, bytes)
        assert theirs.unprotect_rtp(protected) == rtp
        assert theirs.unprotect_rtp(protected) is None  # a replay
    for rtcp in (build_receiver_report(1234, []), build_sender_report(1234, 1, 2, 3, 4)):
        protected = ours.protect_rtcp(rtcp)
        assert theirs.unprotect_rtcp(protected) == rtcp
    assert theirs.unprotect_failures == len(payloads)


@pytest.mark.parametrize("path", list(PATHS))
def test_failures_are_counted_and_refusals_raised_as_pylibsrtp_does(path):
    sender, receiver = pair_of_contexts("AEAD_AES_128_GCM", path, path)
    rtp = RtpPacket(111, 1, 960, 1234, b"opus").serialize()
    tampered = bytearray(sender.protect_rtp(rtp))
    tampered[-1] ^= 1
    assert receiver.unprotect_rtp(bytes(tampered)) is None
    assert receiver.unprotect_rtcp(b"\x80\xc9\x00\x01" + bytes(4)) is None
    assert receiver.unprotect_rtp(b"\x80" * (BUFFER_SIZE + 1)) is None  # too long: not a crash
    assert receiver.unprotect_failures == 3
    with pytest.raises(pylibsrtp.Error):
        sender.protect_rtp(b"\x80\x6f")  # shorter than an RTP header
    with pytest.raises(ValueError):
        sender.protect_rtp(RtpPacket(111, 2, 0, 1234, bytes(BUFFER_SIZE)).serialize())
