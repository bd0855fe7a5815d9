"""SDP for one audio call: parse a WebRTC offer, write the ICE-lite answer (and the client-role
pair, offer and answer parsing, for the project's own load client). Pure code.

The answer accepts the offer's first audio section with Opus only, rejects every other section
(port 0), and lists one host candidate: the relay's public address.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from voicerelay.transceiver.certificate import normalize_fingerprint
from voicerelay.wire.addr import Addr

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")


class SdpError(ValueError):
    """The offer cannot be answered; str(e) is one human-readable line."""


@dataclass
class Section:
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str]] = field(default_factory=list)

    def attr(self, name: str) -> str | None:
        for key, value in self.attributes:
            if key == name:
                return value
        return None

    def attrs(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name]


@dataclass
class Offer:
    ice_ufrag: str
    ice_pwd: str
    fingerprint: str
    setup: str
    mid: str
    opus_pt: int
    opus_fmtp: str | None
    ssrc: int | None
    rejected: list[Section] = field(default_factory=list)  # other m-sections, answered port 0
    bundle: bool = False


@dataclass
class Answer:
    ice_ufrag: str
    ice_pwd: str
    fingerprint: str
    setup: str
    candidate: Addr
    opus_pt: int
    ice_lite: bool


def _parse(text: str) -> tuple[list[tuple[str, str]], list[Section]]:
    if not isinstance(text, str) or not text.lstrip().startswith("v=0"):
        raise SdpError("not SDP: the body must start with v=0")
    session: list[tuple[str, str]] = []
    sections: list[Section] = []
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise SdpError(f"malformed m-line: {value[:60]!r}")
            sections.append(Section(parts[0], int(parts[1].split("/")[0]), parts[2], parts[3:]))
        elif kind == "a":
            name, _, attr_value = value.partition(":")
            (sections[-1].attributes if sections else session).append((name, attr_value))
    return session, sections


def _pick(name: str, section: Section, session: list[tuple[str, str]]) -> str | None:
    value = section.attr(name)
    if value is None:
        value = next((v for k, v in session if k == name), None)
    return value


def parse_offer(text: str) -> Offer:
    """The facts of a WebRTC offer we need to answer; raises only `SdpError`."""
    session, sections = _parse(text)
    audio = next((s for s in sections if s.kind == "audio" and s.port != 0), None)
    if audio is None:
        raise SdpError("offer has no audio m-line")
    opus_pt = None
    for rtpmap in audio.attrs("rtpmap"):
        pt, _, codec = rtpmap.partition(" ")
        if codec.lower().startswith("opus/48000") and pt.isdigit() and pt in audio.formats:
            opus_pt = int(pt)
            break
    if opus_pt is None:
        raise SdpError("offer's audio has no Opus (opus/48000/2) payload type")
    ufrag, pwd = _pick("ice-ufrag", audio, session), _pick("ice-pwd", audio, session)
    if not ufrag or not pwd:
        raise SdpError("offer has no a=ice-ufrag / a=ice-pwd")
    if not (4 <= len(ufrag) <= 256 and _ICE_CHARS.fullmatch(ufrag)):
        raise SdpError("offer's ice-ufrag is not 4-256 ice-chars")
    if not (22 <= len(pwd) <= 256 and _ICE_CHARS.fullmatch(pwd)):
        raise SdpError("offer's ice-pwd is not 22-256 ice-chars")
    fingerprint = _pick("fingerprint", audio, session)
    if not fingerprint or not fingerprint.lower().startswith("sha-256 "):
        raise SdpError("offer has no a=fingerprint:sha-256")
    setup = (_pick("setup", audio, session) or "").strip()
    if setup not in ("actpass", "active", "passive"):
        raise SdpError(f"offer's a=setup is {setup or 'missing'}: use actpass, active or passive")
    fmtp = next(
        (v.partition(" ")[2] for v in audio.attrs("fmtp") if v.partition(" ")[0] == str(opus_pt)),
        None,
    )
    ssrc = None
    for value in audio.attrs("ssrc"):
        head = value.split(" ", 1)[0]
        if head.isdigit() and int(head) < 1 << 32:
            ssrc = int(head)
            break
    mid = audio.attr("mid") or "0"
    return Offer(
        ufrag,
        pwd,
        normalize_fingerprint(fingerprint),
        setup,
        mid,
        opus_pt,
        fmtp,
        ssrc,
        [s for s in sections if s is not audio],
        any(k == "group" and v.startswith("BUNDLE") for k, v in session),
    )


def answer_dtls_role(offer: Offer) -> str:
    """Our DTLS role: the offerer picks; from actpass we take passive (the client starts)."""
    return "client" if offer.setup == "passive" else "server"


def _ip_line(host: str) -> str:
    return f"IN IP{ipaddress.ip_address(host).version} {host}"


def build_answer(
    offer: Offer,
    *,
    ice_ufrag: str,
    ice_pwd: str,
    fingerprint: str,
    dtls_role: str,
    candidate: Addr,
    ssrc: int,
    cname: str,
) -> str:
    """The ICE-lite, Opus-only answer, with `candidate` (the relay) as the only candidate."""
    host, port = candidate
    setup = "passive" if dtls_role == "server" else "active"
    transport = [
        f"a=ice-ufrag:{ice_ufrag}",
        f"a=ice-pwd:{ice_pwd}",
        f"a=fingerprint:{fingerprint}",
        f"a=setup:{setup}",
    ]
    lines = [
        "v=0",
        f"o=- {int.from_bytes(os.urandom(7), 'big')} 2 {_ip_line(host)}",
        "s=voicerelay",
        "t=0 0",
    ]
    if offer.bundle:
        lines.append(f"a=group:BUNDLE {offer.mid}")
    lines += [
        "a=ice-lite",
        "a=msid-semantic: WMS voicerelay",
        f"m=audio {port} UDP/TLS/RTP/SAVPF {offer.opus_pt}",
        f"c={_ip_line(host)}",
        f"a=mid:{offer.mid}",
        "a=sendrecv",
        "a=rtcp-mux",
        f"a=rtpmap:{offer.opus_pt} opus/48000/2",
    ]
    if offer.opus_fmtp:
        lines.append(f"a=fmtp:{offer.opus_pt} {offer.opus_fmtp}")
    lines += [
        f"a=ssrc:{ssrc} cname:{cname}",
        "a=msid:voicerelay voicerelay-audio",
        *transport,
        f"a=candidate:1 1 udp 2130706431 {host} {port} typ host",
        "a=end-of-candidates",
    ]
    for other in offer.rejected:
        lines.append(f"m={other.kind} 0 {other.proto} {' '.join(other.formats[:1])}")
        lines.append(f"c={_ip_line(host)}")
        if other.attr("mid") is not None:
            lines.append(f"a=mid:{other.attr('mid')}")
        lines += [*transport, "a=inactive"]
    return "\r\n".join(lines) + "\r\n"


def build_offer(
    *, ice_ufrag: str, ice_pwd: str, fingerprint: str, ssrc: int, cname: str, opus_pt: int = 111
) -> str:
    """A minimal audio offer (client role, non-trickle without candidates: the server is lite)."""
    return (
        "\r\n".join(
            [
                "v=0",
                f"o=- {int.from_bytes(os.urandom(7), 'big')} 2 IN IP4 127.0.0.1",
                "s=-",
                "t=0 0",
                "a=group:BUNDLE 0",
                "m=audio 9 UDP/TLS/RTP/SAVPF " + str(opus_pt),
                "c=IN IP4 0.0.0.0",
                "a=mid:0",
                "a=sendrecv",
                "a=rtcp-mux",
                f"a=rtpmap:{opus_pt} opus/48000/2",
                f"a=fmtp:{opus_pt} minptime=10;useinbandfec=1",
                f"a=ssrc:{ssrc} cname:{cname}",
                f"a=ice-ufrag:{ice_ufrag}",
                f"a=ice-pwd:{ice_pwd}",
                f"a=fingerprint:{fingerprint}",
                "a=setup:actpass",
            ]
        )
        + "\r\n"
    )


def parse_answer(text: str) -> Answer:
    """The facts of an answer a client needs; raises only `SdpError`."""
    session, sections = _parse(text)
    audio = next((s for s in sections if s.kind == "audio" and s.port != 0), None)
    if audio is None:
        raise SdpError("answer has no audio m-line")
    ufrag, pwd = _pick("ice-ufrag", audio, session), _pick("ice-pwd", audio, session)
    fingerprint = _pick("fingerprint", audio, session)
    setup = _pick("setup", audio, session)
    if not (ufrag and pwd and fingerprint and setup):
        raise SdpError("answer lacks ice-ufrag, ice-pwd, fingerprint or setup")
    candidate = None
    for value in audio.attrs("candidate"):
        parts = value.split()
        if len(parts) >= 8 and parts[2].lower() == "udp" and parts[5].isdigit():
            candidate = (parts[4], int(parts[5]))
            break
    if candidate is None:
        raise SdpError("answer has no UDP candidate")
    return Answer(
        ufrag,
        pwd,
        normalize_fingerprint(fingerprint),
        setup.strip(),
        candidate,
        int(audio.formats[0]) if audio.formats[0].isdigit() else 111,
        any(k == "ice-lite" for k, _ in session),
    )
