"""SrtpContext: the reused-buffer path through pylibsrtp's binding matches its public API."""

from __future__ import annotations

import os

import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.transceiver.dtls import SrtpKeys
from voicerelay.transceiver.rtp import (
    RtpPacket,
    build_receiver_report,
    build_sender_report,
)
from voicerelay.transceiver.srtp import BUFFER_SIZE, SrtpContext

PROFILES = {"AEAD_AES_128_GCM": 28, "AES_CM_128_HMAC_SHA1_80": 30}


def pair_of_contexts(
    profile: str, *, sender_binding: bool, receiver_binding: bool
) -> tuple[SrtpContext, SrtpContext]:
    """Two ends of one SRTP association, each on the path asked for."""
    a, b = os.urandom(PROFILES[profile]), os.urandom(PROFILES[profile])
    sender = SrtpContext(SrtpKeys(profile, a, b), use_binding=sender_binding)
    receiver = SrtpContext(SrtpKeys(profile, b, a), use_binding=receiver_binding)
    assert (sender.uses_binding, receiver.uses_binding) == (sender_binding, receiver_binding)
    return sender, receiver


def test_the_binding_path_is_in_use():
    context, _ = pair_of_contexts("AEAD_AES_128_GCM", sender_binding=True, receiver_binding=True)
    assert context.uses_binding  # this pylibsrtp still exposes what the hot path needs


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize(("sender_binding", "receiver_binding"), [(True, False), (False, True)])
@settings(max_examples=20, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_each_path_reads_what_the_other_writes(profile, sender_binding, receiver_binding, payloads):
    sender, receiver = pair_of_contexts(
        profile, sender_binding=sender_binding, receiver_binding=receiver_binding
    )
    for seq, payload in enumerate(payloads):
        rtp = RtpPacket(111, seq, seq * 960, 1234, payload).serialize()
        protected = sender.protect_rtp(rtp)
        assert protected != rtp and isinstance(protected, bytes)
        assert receiver.unprotect_rtp(protected) == rtp
        assert receiver.unprotect_rtp(protected) is None  # a replay
    for rtcp in (build_receiver_report(1234, []), build_sender_report(1234, 1, 2, 3, 4)):
        protected = sender.protect_rtcp(rtcp)
        assert receiver.unprotect_rtcp(protected) == rtcp
    assert receiver.unprotect_failures == len(payloads)


@pytest.mark.parametrize("binding", [True, False])
def test_failures_are_counted_and_refusals_raised_as_pylibsrtp_does(binding):
    sender, receiver = pair_of_contexts(
        "AEAD_AES_128_GCM", sender_binding=binding, receiver_binding=binding
    )
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
