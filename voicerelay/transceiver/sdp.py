"""SDP for one audio call: parse a WebRTC offer, write the ICE-lite answer (and the client-role
pair, offer and answer parsing, for the project's own load client). Pure code.

The answer accepts the offer's first audio section with Opus only, rejects every other section
(port 0), and lists one host candidate per public address of the relay (IPv4 and IPv6, in the
order given, priorities descending), then the ICE-TCP candidates when the relay serves TCP.

Offers are bounded so that an answer stays small and cheap: at most `MAX_LINES` lines and
`MAX_SECTIONS` m-lines, and whatever the answer repeats from the offer (media kinds,
protocols, formats, mids, Opus parameters) is a short token. Signaling caps the body at
`MAX_OFFER` bytes before any of this runs.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from voicerelay.transceiver.certificate import normalize_fingerprint
from voicerelay.wire.addr import Addr

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]{1,32}")  # RFC 4566 token, short
_PROTO = re.compile(r"[A-Za-z0-9/_.+-]{1,32}")
_DIGITS = re.compile(r"[0-9]+")
_FMTP = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,255}")  # printable ASCII, up to 256

MAX_OFFER = 32 * 1024  # bytes of offer signaling reads (a browser's audio+video offer: ~10 KB)
MAX_LINES = 1024  # lines in an offer (a browser's audio+video offer: ~150)
MAX_SECTIONS = 16  # m-lines in an offer: one is audio, the others are answered port 0


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
    candidate: Addr  # the first UDP candidate
    opus_pt: int
    ice_lite: bool
    candidates: list[Addr] = field(default_factory=list)  # every UDP candidate, in order


def _parse(text: str) -> tuple[list[tuple[str, str]], list[Section]]:
    """Session attributes and m-sections; bounded work: at most `MAX_LINES` lines are split
    and at most `MAX_SECTIONS` m-lines are accepted."""
    if not isinstance(text, str) or not text.lstrip().startswith("v=0"):
        raise SdpError("not SDP: the body must start with v=0")
    lines = text.split("\n", MAX_LINES)
    if len(lines) > MAX_LINES:
        raise SdpError(f"SDP has more than {MAX_LINES} lines")
    session: list[tuple[str, str]] = []
    sections: list[Section] = []
    for raw in lines:
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            if len(sections) == MAX_SECTIONS:
                raise SdpError(f"SDP has more than {MAX_SECTIONS} m-lines: a call needs one")
            sections.append(_media_line(value))
        elif kind == "a":
            name, _, attr_value = value.partition(":")
            (sections[-1].attributes if sections else session).append((name, attr_value))
    return session, sections


def _media_line(value: str) -> Section:
    """An m-line (`kind port[/count] proto format...`) whose kind and proto are short tokens."""
    parts = value.split()
    port = parts[1].split("/")[0] if len(parts) >= 4 else ""
    number = _number(port, 5)
    if number is None:
        raise SdpError(f"malformed m-line: {value[:60]!r}")
    if not (_TOKEN.fullmatch(parts[0]) and _PROTO.fullmatch(parts[2])):
        raise SdpError(f"m-line with an unknown media or protocol: {value[:60]!r}")
    return Section(parts[0], number, parts[2], parts[3:])


def _number(text: str, digits: int) -> int | None:
    """`text` as an int if it is 1 to `digits` ASCII digits, else None."""
    return int(text) if len(text) <= digits and _DIGITS.fullmatch(text) else None


def _check_echoed(audio: Section, others: list[Section], fmtp: str | None) -> None:
    """What the answer repeats from the offer must be short tokens (one line each)."""
    for section in (audio, *others):
        mid = section.attr("mid")
        if mid is not None and not _TOKEN.fullmatch(mid):
            raise SdpError("offer's a=mid is not a token of 1-32 characters")
        if section is not audio and not _TOKEN.fullmatch(section.formats[0]):
            raise SdpError(f"offer's {section.kind} m-line format is not a short token")
    if fmtp is not None and not _FMTP.fullmatch(fmtp):
        raise SdpError("offer's Opus a=fmtp is not 1-256 printable characters")


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
        number = _number(pt, 3)
        if codec.lower().startswith("opus/48000") and pt in audio.formats and number is not None:
            opus_pt = number
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
        number = _number(value.split(" ", 1)[0], 10)
        if number is not None and number < 1 << 32:
            ssrc = number
            break
    others = [s for s in sections if s is not audio]
    _check_echoed(audio, others, fmtp)
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
        others,
        any(k == "group" and v.startswith("BUNDLE") for k, v in session),
    )


def answer_dtls_role(offer: Offer) -> str:
    """Our DTLS role: the offerer picks; from actpass we take passive (the client starts)."""
    return "client" if offer.setup == "passive" else "server"


def _ip_line(host: str) -> str:
    return f"IN IP{ipaddress.ip_address(host).version} {host}"


HOST_PRIORITY = 2130706431  # RFC 8445 5.1.2.1: host type (126), local preference 65535, RTP


def host_priority(index: int) -> int:
    """The priority of the `index`-th host candidate (0 first): the local preference falls by
    one per candidate, so a client prefers the addresses in the order they are listed."""
    return HOST_PRIORITY - 256 * index


def candidate_lines(addresses: Sequence[Addr], tcp_port: int = 0) -> list[str]:
    """`a=candidate` lines: one UDP host candidate per relay address, in order; then, when
    `tcp_port` is set, the ICE-TCP candidates (`tcp_candidate_lines`)."""
    lines = [
        f"a=candidate:{i + 1} 1 udp {host_priority(i)} {host} {port} typ host"
        for i, (host, port) in enumerate(addresses)
    ]
    return lines + tcp_candidate_lines(addresses, tcp_port)


# RFC 6544 4.2: a TCP host candidate ranks below every UDP one (type preference 90 < 126); its
# local preference puts the direction first (passive: 4) above the order the addresses are in.
TCP_TYPE_PREFERENCE = 90
TCP_PASSIVE_DIRECTION = 4


def tcp_priority(index: int) -> int:
    """The priority of the `index`-th ICE-TCP passive candidate (0 first), component 1."""
    local = (TCP_PASSIVE_DIRECTION << 13) + 8191 - index
    return (TCP_TYPE_PREFERENCE << 24) + (local << 8) + 255


def tcp_candidate_lines(addresses: Sequence[Addr], tcp_port: int) -> list[str]:
    """ICE-TCP passive candidates (RFC 6544) at `tcp_port` on the relay's addresses, listed
    after the UDP ones (foundations follow theirs); none when `tcp_port` is 0."""
    if not tcp_port:
        return []
    first = len(addresses) + 1
    return [
        f"a=candidate:{first + i} 1 tcp {tcp_priority(i)} {host} {tcp_port} typ host "
        "tcptype passive"
        for i, (host, _) in enumerate(addresses)
    ]


def tcp_candidates(text: str) -> list[Addr]:
    """The (address, port) of every ICE-TCP passive candidate an answer's audio section lists,
    in order (what a TCP-only client connects to); SdpError if it is not SDP."""
    _, sections = _parse(text)
    audio = next((s for s in sections if s.kind == "audio" and s.port != 0), None)
    found: list[Addr] = []
    for value in audio.attrs("candidate") if audio is not None else ():
        parts = value.split()
        extensions = dict(zip(parts[8::2], parts[9::2], strict=False))
        if len(parts) < 8 or parts[2].lower() != "tcp" or extensions.get("tcptype") != "passive":
            continue
        port = _number(parts[5], 5)
        try:
            host = str(ipaddress.ip_address(parts[4]))
        except ValueError:
            continue
        if port is not None and 0 < port < 65536:
            found.append((host, port))
    return found


def _addresses(candidate: Addr | Sequence[Addr]) -> list[Addr]:
    """One address, or several, as a non-empty list of (host, port)."""
    if len(candidate) == 2 and isinstance(candidate[0], str):
        return [(candidate[0], int(candidate[1]))]  # type: ignore[arg-type]
    addresses = [(str(host), int(port)) for host, port in candidate]  # type: ignore[misc]
    if not addresses:
        raise ValueError("an answer needs at least one candidate")
    return addresses


def build_answer(
    offer: Offer,
    *,
    ice_ufrag: str,
    ice_pwd: str,
    fingerprint: str,
    dtls_role: str,
    candidate: Addr | Sequence[Addr],
    ssrc: int,
    cname: str,
    tcp_port: int = 0,
) -> str:
    """The ICE-lite, Opus-only answer. `candidate` is the relay's public address, or several
    (IPv4 and IPv6 alike): one host candidate each, in order (`candidate_lines`); the first
    fills the m- and c-lines. `tcp_port`: the relay's ICE-TCP port, 0 for none."""
    addresses = _addresses(candidate)
    host, port = addresses[0]
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
        *candidate_lines(addresses, tcp_port),
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
    candidates = udp_candidates(audio.attrs("candidate"))
    if not candidates:
        raise SdpError("answer has no UDP candidate")
    return Answer(
        ufrag,
        pwd,
        normalize_fingerprint(fingerprint),
        setup.strip(),
        candidates[0],
        _number(audio.formats[0], 3) or 111,
        any(k == "ice-lite" for k, _ in session),
        candidates,
    )


def udp_candidates(values: list[str]) -> list[Addr]:
    """The (address, port) of every well-formed UDP candidate among `a=candidate` values, in
    order, addresses in canonical form; anything else (TCP, names, bad ports) is skipped."""
    found: list[Addr] = []
    for value in values:
        parts = value.split()
        if len(parts) < 8 or parts[2].lower() != "udp":
            continue
        port = _number(parts[5], 5)
        try:
            host = str(ipaddress.ip_address(parts[4]))
        except ValueError:
            continue  # an mDNS name or garbage: nothing a client can check directly
        if port is not None and 0 < port < 65536:
            found.append((host, port))
    return found
