"""SDP against real aiortc offers/answers; RTP/RTCP codec properties."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.transceiver import sdp
from voicerelay.transceiver.rtp import (
    RTCP_RR,
    RTCP_SR,
    ReceiveStats,
    ReportBlock,
    RtpError,
    RtpPacket,
    build_receiver_report,
    build_sender_report,
    parse_rtcp,
    parse_rtp,
)

CHROME_OFFER = """v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0
a=extmap-allow-mixed
a=msid-semantic: WMS 5f0d
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:1 1 udp 2122260223 192.168.1.5 54321 typ host generation 0
a=ice-ufrag:Ab3d
a=ice-pwd:aBcDeFgHiJkLmNoPqRsTuVwX
a=ice-options:trickle
a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B:19:E5:7C:AB:3B:63:D4:26:1A:A0:2B:EB:8D:E4:3A:71
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=sendrecv
a=msid:5f0d 7c1e
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=rtpmap:9 G722/8000
a=ssrc:3735928559 cname:abc
"""


def test_a_chromium_offer_parses_and_gets_an_ice_lite_answer():
    offer = sdp.parse_offer(CHROME_OFFER)
    assert (offer.ice_ufrag, offer.setup, offer.mid, offer.opus_pt) == ("Ab3d", "actpass", "0", 111)
    assert offer.ssrc == 3735928559 and offer.opus_fmtp == "minptime=10;useinbandfec=1"
    assert sdp.answer_dtls_role(offer) == "server"
    answer = sdp.build_answer(
        offer,
        ice_ufrag="TOKEN",
        ice_pwd="p" * 24,
        fingerprint="sha-256 AA:BB",
        dtls_role="server",
        candidate=("127.0.0.1", 3478),
        ssrc=7,
        cname="x",
    )
    assert "a=ice-lite" in answer and "a=setup:passive" in answer
    assert "m=audio 3478 UDP/TLS/RTP/SAVPF 111\r\n" in answer
    assert answer.count("a=candidate:") == 1 and "a=end-of-candidates" in answer
    assert "G722" not in answer and "a=group:BUNDLE 0" in answer
    parsed = sdp.parse_answer(answer)
    assert parsed.candidate == ("127.0.0.1", 3478) and parsed.ice_lite


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: "hello", "v=0"),
        (lambda s: s.replace("m=audio", "m=video"), "no audio"),
        (lambda s: s.replace("opus/48000/2", "PCMU/8000"), "Opus"),
        (lambda s: s.replace("a=fingerprint", "a=x-fingerprint"), "fingerprint"),
        (lambda s: s.replace("a=ice-pwd", "a=x-pwd"), "ice-ufrag"),
        (lambda s: s.replace("a=setup:actpass", "a=setup:holdconn"), "setup"),
    ],
)
def test_bad_offers_say_what_is_wrong(mutate, message):
    with pytest.raises(sdp.SdpError, match=message):
        sdp.parse_offer(mutate(CHROME_OFFER))


@given(st.text(max_size=400))
def test_parse_offer_raises_only_sdp_error(text):
    with contextlib.suppress(sdp.SdpError):
        sdp.parse_offer(text)


# Offers are bounded: the answer stays small and cheap (issue 11) --------------------------------
MAX_ANSWER = 8192  # bytes: what any accepted offer's answer stays under
ANSWER_ARGS = {
    "ice_ufrag": "T" * 80,  # about a routing token's length
    "ice_pwd": "p" * 24,
    "fingerprint": "sha-256 " + ":".join(["AB"] * 32),
    "dtls_role": "server",
    "candidate": ("2001:db8::1", 3478),
    "ssrc": 4294967295,
    "cname": "voicerelay-0123abcd",
}


def test_an_offer_of_many_minimal_m_lines_is_refused_in_one_line():
    with pytest.raises(sdp.SdpError, match="more than 16 m-lines") as refused:
        sdp.parse_offer(CHROME_OFFER + "m=video 9 X 0\r\n" * 16)
    assert "\n" not in str(refused.value)
    assert sdp.parse_offer(CHROME_OFFER + "m=video 9 X 0\r\n" * 15).rejected[14].kind == "video"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.replace("m=audio 9", "m=audio " + "9" * 5000), "malformed m-line"),
        (lambda s: s.replace("a=ssrc:3735928559", "a=ssrc:" + "3" * 5000), None),
        (
            lambda s: s.replace("111 63", "1" * 5000 + " 63").replace(
                "rtpmap:111", "rtpmap:" + "1" * 5000
            ),
            "Opus",
        ),
        (lambda s: s.replace("m=audio 9", "m=audio \u00b2"), "malformed m-line"),
        (lambda s: s.replace("a=mid:0", "a=mid:" + "m" * 33), "a=mid"),
        (lambda s: s + "m=" + "v" * 40 + " 9 UDP/DTLS/SCTP x\r\n", "unknown media"),
        (lambda s: s + "m=application 9 UDP/DTLS/SCTP " + "w" * 40 + "\r\n", "format"),
        (lambda s: s.replace("useinbandfec=1", "x" * 300), "fmtp"),
        (lambda s: s + "a=x\n" * 1100, "more than 1024 lines"),
    ],
)
def test_long_or_odd_fields_are_refused_or_ignored_never_a_crash(mutate, message):
    if message is None:
        assert sdp.parse_offer(mutate(CHROME_OFFER)).ssrc is None  # an unusable ssrc: ignored
        return
    with pytest.raises(sdp.SdpError, match=message):
        sdp.parse_offer(mutate(CHROME_OFFER))


def _field(first: int) -> st.SearchStrategy[str]:
    """Text of any length from 1 to 600, lengths uniformly drawn (long ones are common)."""
    chars = st.characters(min_codepoint=first, max_codepoint=0x2FF)
    return st.integers(1, 600).flatmap(lambda n: st.text(chars, min_size=n, max_size=n))


FIELD = _field(33)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(FIELD, FIELD, FIELD, st.none() | FIELD), max_size=24),
    st.none() | FIELD,
    st.none() | _field(32),
)
def test_any_accepted_offer_gets_a_small_answer(sections, mid, fmtp):
    """Extra m-lines with arbitrary kinds, protocols, formats and mids, an arbitrary mid and
    Opus fmtp: parse_offer raises only SdpError, and what it accepts is answered in < 8 KB
    with no line longer than an Opus fmtp may make it."""
    offer = CHROME_OFFER
    if mid is not None:
        offer = offer.replace("a=mid:0", f"a=mid:{mid}")
    if fmtp is not None:
        offer = offer.replace("minptime=10;useinbandfec=1", fmtp)
    for kind, proto, fmt, section_mid in sections:
        offer += f"m={kind} 9 {proto} {fmt}\r\n" + (
            f"a=mid:{section_mid}\r\n" if section_mid else ""
        )
    try:
        parsed = sdp.parse_offer(offer)
    except sdp.SdpError as exc:
        assert "\n" not in str(exc)
        return
    answer = sdp.build_answer(parsed, **ANSWER_ARGS)
    assert len(answer) < MAX_ANSWER
    assert max(len(line) for line in answer.splitlines()) <= 300


def worst_accepted_offer() -> str:
    """As costly as an accepted offer gets: MAX_OFFER bytes in MAX_LINES lines, MAX_SECTIONS
    m-lines whose echoed fields are as long as allowed, the audio section full of attributes
    that every lookup walks past."""
    head = CHROME_OFFER.replace("\n", "\r\n")
    others = "".join(
        f"m={'v' * 32} 9 {'P' * 32} {'f' * 32}\r\na=mid:{'m' * 31}{i:x}\r\n"
        for i in range(sdp.MAX_SECTIONS - 1)
    )
    lines = sdp.MAX_LINES - 1 - head.count("\n") - others.count("\n")
    per_line, spare = divmod(sdp.MAX_OFFER - len(head) - len(others), lines)
    filler = "a=ssrc:" + "x" * spare + ("x" * (per_line - 9) + "\r\na=ssrc:") * lines
    filler = filler.removesuffix("a=ssrc:")
    return head.replace("a=ssrc:3735928559", filler + "a=ssrc:3735928559") + others


def test_the_worst_accepted_offer_is_answered_in_about_a_millisecond():
    offer = worst_accepted_offer()
    assert sdp.MAX_OFFER - 64 < len(offer.encode()) <= sdp.MAX_OFFER
    assert offer.count("\n") == sdp.MAX_LINES - 1
    times = []
    for _ in range(20):
        started = time.perf_counter()
        answer = sdp.build_answer(sdp.parse_offer(offer), **ANSWER_ARGS)
        times.append(time.perf_counter() - started)
    assert answer.count("m=") == sdp.MAX_SECTIONS and len(answer) < MAX_ANSWER
    assert min(times) < 0.002, f"{min(times) * 1000:.2f} ms"  # ~0.3 ms on the dev machine


@given(
    st.text(alphabet="abcdefXYZ0123+/", min_size=4, max_size=32),
    st.text(alphabet="abcdefXYZ0123+/", min_size=22, max_size=40),
    st.integers(0, 2**32 - 1),
    st.integers(96, 127),
)
def test_build_offer_round_trips(ufrag, pwd, ssrc, pt):
    offer = sdp.parse_offer(
        sdp.build_offer(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprint="sha-256 ab:cd",
            ssrc=ssrc,
            cname="c",
            opus_pt=pt,
        )
    )
    assert (offer.ice_ufrag, offer.ice_pwd, offer.ssrc, offer.opus_pt) == (ufrag, pwd, ssrc, pt)
    assert offer.fingerprint == "sha-256 AB:CD"


def test_aiortc_offer_parses_and_aiortc_accepts_our_answer():
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from voicerelay.cli.call_client import gathering_from

    async def roundtrip():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("chat")  # an extra section we must reject cleanly
        with gathering_from(["127.0.0.1"]):
            await pc.setLocalDescription(await pc.createOffer())
        offer = sdp.parse_offer(pc.localDescription.sdp)
        answer = sdp.build_answer(
            offer,
            ice_ufrag="TOKENabc",
            ice_pwd="p" * 24,
            fingerprint="sha-256 " + ":".join(["AB"] * 32),
            dtls_role="server",
            candidate=[("::1", 3478), ("127.0.0.1", 3478)],
            ssrc=99,
            cname="x",
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        directions = [t.currentDirection for t in pc.getTransceivers()]
        ice = pc.getTransceivers()[0].receiver.transport.transport
        candidates = (
            [(c.ip, c.port) for c in ice.iceGatherer.getLocalCandidates()],
            [(c.ip, c.port) for c in ice.getRemoteCandidates()],
        )
        await pc.close()
        return offer, directions, candidates

    offer, directions, (local, remote) = asyncio.run(roundtrip())
    assert offer.setup == "actpass" and offer.opus_pt > 0 and len(offer.rejected) == 1
    assert directions == ["sendrecv"]
    assert [host for host, _ in local] == ["127.0.0.1"]  # gathered where we were told
    assert remote == [("::1", 3478), ("127.0.0.1", 3478)]  # aiortc took both candidates


# Several relay addresses: one candidate each, in order (issue 12) ------------------------------
def test_every_relay_address_is_a_candidate_in_order_with_falling_priority():
    offer = sdp.parse_offer(CHROME_OFFER)
    addresses = [("192.0.2.10", 3478), ("2001:db8::10", 3478), ("127.0.0.1", 3479)]
    answer = sdp.build_answer(offer, **{**ANSWER_ARGS, "candidate": addresses})
    lines = [ln for ln in answer.split("\r\n") if ln.startswith("a=candidate:")]
    assert lines == [
        "a=candidate:1 1 udp 2130706431 192.0.2.10 3478 typ host",
        "a=candidate:2 1 udp 2130706175 2001:db8::10 3478 typ host",
        "a=candidate:3 1 udp 2130705919 127.0.0.1 3479 typ host",
    ]
    assert "m=audio 3478 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 192.0.2.10\r\n" in answer
    assert answer.index("a=candidate:3") < answer.index("a=end-of-candidates")
    parsed = sdp.parse_answer(answer)
    assert parsed.candidates == addresses and parsed.candidate == addresses[0]


def test_one_address_and_a_list_of_one_give_the_same_candidates():
    offer = sdp.parse_offer(CHROME_OFFER)
    one = sdp.build_answer(offer, **{**ANSWER_ARGS, "candidate": ("::1", 3478)})
    listed = sdp.build_answer(offer, **{**ANSWER_ARGS, "candidate": [("::1", 3478)]})
    cut = lambda text: [ln for ln in text.split("\r\n") if not ln.startswith("o=")]  # noqa: E731
    assert cut(one) == cut(listed)


addresses = st.lists(
    st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), min_size=1, max_size=8
)


@given(addresses)
def test_candidates_round_trip_and_priorities_fall_in_order(relay):
    offer = sdp.parse_offer(CHROME_OFFER)
    answer = sdp.build_answer(offer, **{**ANSWER_ARGS, "candidate": relay})
    assert sdp.parse_answer(answer).candidates == relay
    priorities = [int(ln.split()[3]) for ln in answer.split("\r\n") if "a=candidate:" in ln]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == len(relay)


def test_only_well_formed_udp_candidates_are_read_from_an_answer():
    values = [
        "1 1 udp 2130706431 192.0.2.1 3478 typ host",
        "2 1 tcp 1518280447 192.0.2.1 443 typ host tcptype passive",
        "3 1 udp 2130706431 abcd.local 3478 typ host",
        "4 1 udp 2130706431 192.0.2.2 0 typ host",
        "5 1 udp 2130706431 192.0.2.3 99999 typ host",
        "6 1 UDP 2130706431 2001:DB8::1 3478 typ host",
        "7 1 udp",
    ]
    assert sdp.udp_candidates(values) == [("192.0.2.1", 3478), ("2001:db8::1", 3478)]


rtp_packets = st.builds(
    RtpPacket,
    st.integers(0, 127),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
    st.booleans(),
    st.lists(st.integers(0, 2**32 - 1), max_size=15),
    st.none()
    | st.tuples(
        st.integers(0, 0xFFFF), st.binary(max_size=12).map(lambda b: b + b"\0" * (-len(b) % 4))
    ),
)


@given(rtp_packets)
def test_rtp_round_trips(packet):
    assert parse_rtp(packet.serialize()) == packet


@given(st.binary(max_size=80))
def test_rtp_and_rtcp_parsers_raise_only_rtp_error(data):
    for parser in (parse_rtp, parse_rtcp):
        with contextlib.suppress(RtpError):
            parser(data)


blocks = st.builds(
    ReportBlock,
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(-(2**23), 2**23 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)


@given(st.integers(0, 2**32 - 1), st.lists(blocks, max_size=5), st.integers(0, 2**64 - 1))
def test_reports_round_trip(ssrc, reports, ntp):
    rr, sr = parse_rtcp(
        build_receiver_report(ssrc, reports) + build_sender_report(ssrc, ntp, 1, 2, 3, reports)
    )
    assert (rr.packet_type, rr.ssrc, rr.reports) == (RTCP_RR, ssrc, reports)
    assert (sr.packet_type, sr.ntp, sr.packet_count, sr.reports) == (RTCP_SR, ntp, 2, reports)


def test_receive_stats_count_loss_and_wraparound():
    stats = ReceiveStats()
    for seq in [65530, 65531, 65533, 65535, 0, 1, 3]:
        stats.add(1, seq, seq * 960, seq * 0.02)
    assert stats.expected == 10 and stats.received == 7 and stats.lost == 3
    block = stats.report_block(1.0)
    assert block.highest_sequence == 65536 + 3 and block.fraction_lost == (3 << 8) // 10
