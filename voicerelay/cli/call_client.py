"""A command-line WebRTC client (aiortc): place one call and hear what comes back.

Two calls share one set of pieces (a paced microphone track, signaling, the remote-audio pump,
hang-up with both sides' statistics):

- `place_call(url, tone_hz, seconds)` sends a sine tone, finds the strongest frequency of what
  comes back with an FFT (and how much of the energy is that tone), notes how long the audio
  kept coming and what RTCP both sides reported, and hangs up.
- `place_voice_call(url, play, record)` plays a recording as the microphone, then silence; puts
  everything that comes back on the call's timeline (sample 0 = our first frame), listens until
  the far end has answered and gone quiet, reports the turn timings (`turns.py`) and the
  conversation events the server offers, and can write what came back as a WAV.

Both post the offer before gathering (the server is ICE-lite: it needs none of our candidates),
then gather only local addresses that can reach the candidates of the answer: the source
address the kernel routes from towards each of them (loopback for loopback, this host's
interface address otherwise), or `local_address` when given. A failed call names the step
that failed (signaling, ICE, DTLS, media) and the likely fix, in one line.

The pure parts (WAV codec, timeline, listening plan, event-stream parser, which addresses to
gather, which step failed) take bytes, arrays, states and times; only the `place_*` shells
read clocks and use sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fractions
import ipaddress
import math
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import numpy as np

from voicerelay.cli.turns import (
    OFF_DBFS,
    ON_DBFS,
    Segment,
    Turn,
    analyse_turns,
    dbfs,
    find_segments,
)
from voicerelay.transceiver.client import ClientCall

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


# --- which local addresses to gather (pure), and telling aioice ---------------------------

_GATHER: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "voicerelay_gather", default=None
)


def _install_gather_hook() -> None:
    """Route aioice's host-address lookup through `_GATHER` (once per process): within
    `gathering_from`, the addresses given; elsewhere aioice's own choice."""
    import aioice.ice

    own = aioice.ice.get_host_addresses
    if getattr(own, "voicerelay_hook", False):
        return

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _GATHER.get()
        return list(chosen) if chosen is not None else own(use_ipv4, use_ipv6)

    host_addresses.voicerelay_hook = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = host_addresses


@contextlib.contextmanager
def gathering_from(addresses: Sequence[str]) -> Iterator[None]:
    """Within this block (this task and the tasks it starts), aiortc gathers host candidates
    on exactly `addresses` (aioice alone skips loopback)."""
    _install_gather_hook()
    token = _GATHER.set(tuple(addresses))
    try:
        yield
    finally:
        _GATHER.reset(token)


def route_source(host: str) -> str | None:
    """The local address the kernel would send from towards `host` (a UDP connect sends
    nothing), or None if there is no route."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(ipaddress.ip_address(probe.getsockname()[0]))
    except OSError:
        return None


def gather_plan(
    remote: Sequence[str],
    source: Callable[[str], str | None] = route_source,
    local_address: str | None = None,
) -> list[str]:
    """The local addresses to gather for an answer whose candidates are at `remote`: the
    given `local_address`, else the source address `source` names for each candidate (those
    without a route skipped), in the candidates' order, no repeats."""
    if local_address is not None:
        return [local_address]
    found = (source(host) for host in remote)
    return list(dict.fromkeys(a for a in found if a is not None))


# --- which step failed (pure) --------------------------------------------------------------

CONNECTED_ICE = ("connected", "completed")


def failed_step(ice_state: str, dtls_state: str) -> Literal["ICE", "DTLS", "media"]:
    """The first step of a call that had not got through when it gave up: ICE, then DTLS;
    past both, the media."""
    if ice_state not in CONNECTED_ICE:
        return "ICE"
    if dtls_state != "connected":
        return "DTLS"
    return "media"


def _addrs(addresses: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses) or "none"


def failure_line(
    step: Literal["ICE", "DTLS", "media"],
    waited: float,
    *,
    candidates: Sequence[tuple[str, int]],
    local: Sequence[str],
    ice_state: str,
    dtls_state: str,
    media: str = "no audio came back",
) -> str:
    """One line: which step failed after `waited` seconds, what was tried, the likely fix."""
    if step == "ICE":
        return (
            f"ICE did not connect within {waited:g} s (ICE {ice_state}): nothing answered at "
            f"{_addrs(candidates)} from {', '.join(local) or 'no local address'}; is the relay "
            "running and its UDP port reachable from this host? (the stack's --advertise "
            "names those addresses; --local-address picks ours)"
        )
    if step == "DTLS":
        return (
            f"DTLS did not complete within {waited:g} s although ICE connected "
            f"(DTLS {dtls_state}): the transceiver behind the relay did not finish the "
            "handshake; see the transceiver's log"
        )
    return (
        f"media: {media} within {waited:g} s of connecting: the call is up but nothing "
        "came back; a tone comes back only from the echo app (relayctl up --app echo)"
    )


def no_route_line(candidates: Sequence[tuple[str, int]]) -> str:
    """ICE cannot even start: no local address routes to any candidate of the answer."""
    return (
        f"ICE cannot start: no route from this host to the answer's candidates "
        f"{_addrs(candidates)}; the stack must advertise an address this host reaches "
        "(its --advertise), or pick ours with --local-address"
    )


def dominant_frequency(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """The frequency (Hz) with the most energy in a mono signal."""
    if samples.size < 256:
        return 0.0
    window = np.hanning(samples.size)
    spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * window))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(samples.size, 1.0 / rate)[int(np.argmax(spectrum))])


def tone_purity(
    samples: np.ndarray, freq: float, rate: int = SAMPLE_RATE, band: float = 25.0
) -> float:
    """The share of a signal's energy (DC excluded) within `band` Hz of `freq`: ~1.0 for a
    clean tone, low when other sounds (another call's tone, noise) are mixed in."""
    if samples.size < 256:
        return 0.0
    window = np.hanning(samples.size)
    power = np.abs(np.fft.rfft((samples - samples.mean()) * window)) ** 2
    power[0] = 0.0
    total = float(power.sum())
    if total <= 0.0:
        return 0.0
    freqs = np.fft.rfftfreq(samples.size, 1.0 / rate)
    return float(power[np.abs(freqs - freq) <= band].sum() / total)


# --- WAV files (pure: bytes in, arrays out) -------------------------------------------------


class WavError(ValueError):
    """A file `--play` cannot use; str(e) is one line saying why."""


_WAV_ENCODINGS = {3: "32-bit float", 6: "A-law", 7: "mu-law", 2: "ADPCM", 17: "IMA ADPCM"}


def _riff_chunks(data: bytes) -> dict[bytes, bytes]:
    """The first chunk of each id in a RIFF/WAVE file (a truncated last chunk is kept short)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a WAV file (no RIFF/WAVE header)")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunks.setdefault(chunk_id, data[pos + 8 : pos + 8 + size])
        pos += 8 + size + (size & 1)
    return chunks


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV (mono or stereo, any rate) as int16 samples shaped (frames, channels)
    and its sample rate. Raises only `WavError`."""
    chunks = _riff_chunks(data)
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise WavError("not a usable WAV file (no fmt chunk)")
    encoding, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if encoding == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's code
        encoding = int.from_bytes(fmt[24:26], "little")
    if encoding != 1:
        name = _WAV_ENCODINGS.get(encoding, f"format {encoding}")
        raise WavError(f"unsupported WAV encoding ({name}): use 16-bit PCM")
    if bits != 16:
        raise WavError(f"unsupported sample width ({bits}-bit): use 16-bit PCM")
    if channels not in (1, 2):
        raise WavError(f"unsupported channel count ({channels}): use mono or stereo")
    if not 1000 <= rate <= 768000:
        raise WavError(f"unsupported sample rate ({rate} Hz)")
    pcm = chunks.get(b"data")
    if pcm is None:
        raise WavError("not a usable WAV file (no data chunk)")
    frames = len(pcm) // (2 * channels)
    if frames == 0:
        raise WavError("the WAV file holds no audio")
    samples = np.frombuffer(pcm, dtype="<i2", count=frames * channels)
    return samples.reshape(frames, channels).astype(np.int16), rate


def encode_wav(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Mono int16 samples as a 16-bit PCM WAV file."""
    body = np.asarray(pcm, dtype="<i2").ravel().tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return b"".join(
        [
            b"RIFF",
            struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)),
            b"WAVE",
            b"fmt ",
            struct.pack("<I", len(fmt)),
            fmt,
            b"data",
            struct.pack("<I", len(body)),
            body,
        ]
    )


def to_call_audio(samples: np.ndarray, rate: int) -> np.ndarray:
    """(frames, channels) int16 at `rate` as 48 kHz mono int16 (channels averaged, soxr)."""
    import soxr

    mono = np.asarray(samples, dtype=np.float32).reshape(len(samples), -1).mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return np.clip(np.round(mono), -32768, 32767).astype(np.int16)


def load_wav(path: Path) -> np.ndarray:
    """A WAV file as 48 kHz mono int16, ready to play. Raises only `WavError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WavError(f"cannot read it: {exc.strerror or exc}") from None
    return to_call_audio(*decode_wav(data))


# --- what came back, on the call's timeline (sans-IO) --------------------------------------


class Timeline:
    """Received audio placed where it arrived: sample 0 is our first sent frame.

    A frame starts at its arrival time, with two allowances for arrival jitter, as a playout
    buffer would make them. A frame that arrives less than half a frame after the previous one
    ended follows on without a gap (a real gap, lost or absent audio, is at least a frame). A
    frame that arrives while the previous one still plays (frames bunched up after a stall)
    follows on too if it has sound, whole; if it is silent it gives up as much of its start as
    the timeline is behind (all of itself if need be), so a stall does not shift everything
    after it. Sound is thus never lost, nor placed more than half a frame before it arrived.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._chunks: list[tuple[int, np.ndarray]] = []
        self._cursor = 0  # end of the last placed frame, in samples
        self.frames = 0  # frames received
        self.trimmed = 0  # silent samples given up to catch up after a stall
        self.audible_samples = 0
        self.first_audible_s: float | None = None  # where the first frame with sound starts
        self.last_audible_s: float | None = None  # where the last frame with sound ends

    def place(self, pcm: np.ndarray, at_s: float) -> None:
        """One received frame (mono int16) that arrived `at_s` seconds into the call."""
        pcm = np.asarray(pcm, dtype=np.int16).ravel()
        if pcm.size == 0:
            return
        self.frames += 1
        at = max(0, round(at_s * self.rate)) if math.isfinite(at_s) else self._cursor
        level = dbfs(pcm)
        if self._chunks and 0 < at - self._cursor < pcm.size // 2:
            at = self._cursor  # jitter, not a gap
        if at < self._cursor and level < OFF_DBFS:
            behind = min(self._cursor - at, pcm.size)
            self.trimmed += behind
            pcm = pcm[behind:]
        at = max(at, self._cursor)
        if pcm.size == 0:
            return
        self._chunks.append((at, pcm.copy()))
        self._cursor = at + pcm.size
        if level >= ON_DBFS:
            self.audible_samples += pcm.size
            if self.first_audible_s is None:
                self.first_audible_s = at / self.rate
            self.last_audible_s = self._cursor / self.rate

    @property
    def duration_s(self) -> float:
        return self._cursor / self.rate

    def samples(self, until_s: float = 0.0) -> np.ndarray:
        """Everything placed, silence in between, at least `until_s` seconds long."""
        out = np.zeros(max(self._cursor, round(max(until_s, 0.0) * self.rate)), dtype=np.int16)
        for at, pcm in self._chunks:
            out[at : at + pcm.size] = pcm
        return out


@dataclass(frozen=True)
class ListenPlan:
    """When a played call has heard enough (pure: timeline seconds in, a verdict out).

    Nothing ends before the recording has played. Then the call is `done` once the far end has
    been quiet for `quiet_s` after sound that ended later than the person's last words (a reply
    to them), or `listen_s` after the recording ended at most; it is `silent` if no sound at
    all came back within `timeout_s` of the recording's end.
    """

    played_end_s: float
    speech_end_s: float
    quiet_s: float = 1.5
    listen_s: float = 15.0
    timeout_s: float = 10.0

    def verdict(
        self, now_s: float, last_audible_s: float | None
    ) -> Literal["listen", "done", "silent"]:
        if now_s < self.played_end_s:
            return "listen"
        waited = now_s - self.played_end_s
        if last_audible_s is None:
            return "silent" if waited >= min(self.timeout_s, self.listen_s) else "listen"
        answered = last_audible_s > self.speech_end_s
        if (answered and now_s - last_audible_s >= self.quiet_s) or waited >= self.listen_s:
            return "done"
        return "listen"


# --- conversation events (Server-Sent Events, sans-IO parser) ------------------------------


class EventStreamParser:
    """`text/event-stream` bytes in, the JSON objects of complete `data:` messages out.

    Lines end in LF (a CR before it is dropped); a blank line ends a message, its `data:`
    lines joined by newlines. Messages that are not a JSON object are counted in `bad`, and so
    is a line longer than `max_line`; nothing raises.
    """

    def __init__(self, max_line: int = 1 << 20) -> None:
        self.max_line = max_line
        self.bad = 0
        self._pending = b""
        self._data: list[str] = []
        self._oversized = False

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            if self._oversized:  # the rest of a line already counted as bad
                self._oversized = False
                continue
            self._line(line.removesuffix(b"\r"), out)
        if len(self._pending) > self.max_line:
            self.bad += 0 if self._oversized else 1
            self._pending, self._oversized, self._data = b"", True, []
        return out

    def _line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        if not line:
            if self._data:
                event = self._decode("\n".join(self._data))
                self._data = []
                if event is not None:
                    out.append(event)
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" ").decode("utf-8", "replace"))

    def _decode(self, text: str) -> dict[str, Any] | None:
        import json

        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.bad += 1
            return None
        return event


@dataclass
class EventLog:
    """What a call's event stream gave: events in arrival order and how the stream went."""

    events: list[dict[str, Any]] = field(default_factory=list)
    status: str = "not requested"  # streaming, ended, not offered (404), unavailable (...)
    bad: int = 0  # messages that were not JSON objects


async def collect_events(http: aiohttp.ClientSession, url: str, log: EventLog) -> None:
    """Read the Server-Sent Events at `url` into `log` until the stream ends (or the task is
    cancelled). A server without the endpoint is only noted in `log.status`."""
    try:
        async with http.get(
            url,
            headers={"Accept": "text/event-stream"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as resp:
            if resp.status != 200:
                log.status = f"not offered ({resp.status})"
                return
            log.status = "streaming"
            parser = EventStreamParser()
            async for chunk in resp.content.iter_any():
                log.events.extend(parser.feed(chunk))
                log.bad = parser.bad
            log.status = "ended"
    except (aiohttp.ClientError, OSError) as exc:
        log.status = f"unavailable ({exc.__class__.__name__})"


def conversation(events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Transcripts (`user.transcript`, final `agent.transcript`) as {who, text, item_id, at_ms}
    and `agent.interrupted` events, in arrival order; malformed events are skipped."""
    transcripts, interruptions = [], []
    for event in events:
        kind, text = event.get("type"), event.get("text")
        who = {"user.transcript": "you", "agent.transcript": "agent"}.get(str(kind))
        final = kind == "user.transcript" or event.get("final") is True
        if who and final and isinstance(text, str):
            transcripts.append(
                {
                    "who": who,
                    "text": text,
                    "item_id": event.get("item_id"),
                    "at_ms": event.get("at_ms"),
                }
            )
        elif kind == "agent.interrupted":
            interruptions.append(
                {k: event.get(k) for k in ("item_id", "sent_ms", "at_ms") if k in event}
            )
    return transcripts, interruptions


# --- reports --------------------------------------------------------------------------------


@dataclass
class CallReport:
    url: str
    tone_hz: float
    connected: bool = False
    received_hz: float | None = None
    purity: float | None = None  # share of the echoed energy that is our tone
    setup_ms: float | None = None  # offer posted -> first echoed audio
    frames_received: int = 0
    audio_seconds: float = 0.0  # how much echoed audio came back
    max_frame_gap_ms: float | None = None  # longest wait between echoed frames, after the first
    error: str | None = None
    step: str | None = None  # what failed: signaling, ICE, DTLS or media
    session_url: str | None = None
    offer_sdp: str | None = None
    answer_sdp: str | None = None
    candidates: list = field(default_factory=list)  # the answer's UDP candidates [host, port]
    local_addresses: list[str] = field(default_factory=list)  # where we gathered
    stats: dict = field(default_factory=dict)  # delete_status, client (aiortc), server (JSON)

    @property
    def tone_came_back(self) -> bool:
        return self.received_hz is not None and abs(self.received_hz - self.tone_hz) <= 10.0


@dataclass
class VoiceCallReport:
    """A played call: timings on the call's timeline (seconds from our first sent frame)."""

    url: str
    played_s: float = 0.0  # what we played, lead-in silence included
    lead_in_s: float = 0.0  # silence before the recording
    connected: bool = False  # media flowed (our first frame went out)
    setup_ms: float | None = None  # offer posted -> our first frame sent
    first_audio_s: float | None = None  # the first sound that came back
    received_s: float = 0.0  # length of the call's timeline (the recording)
    audible_s: float = 0.0  # how much sound came back
    frames_received: int = 0
    spoken: list[Segment] = field(default_factory=list)  # the person's speech we played
    replies: list[Segment] = field(default_factory=list)  # sound that came back
    turns: list[Turn] = field(default_factory=list)
    overlaps: list[Segment] = field(default_factory=list)  # replies begun while we spoke
    median_response_ms: float | None = None
    transcripts: list[dict] = field(default_factory=list)
    interruptions: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # the server's conversation events
    events_status: str = "not requested"
    recording: str | None = None  # where what came back was written
    error: str | None = None
    step: str | None = None  # what failed: signaling, ICE, DTLS or media
    session_url: str | None = None
    offer_sdp: str | None = None
    answer_sdp: str | None = None
    candidates: list = field(default_factory=list)  # the answer's UDP candidates [host, port]
    local_addresses: list[str] = field(default_factory=list)  # where we gathered
    stats: dict = field(default_factory=dict)  # delete_status, client (aiortc), server (JSON)
    received: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16), repr=False)

    @property
    def audio_came_back(self) -> bool:
        return self.audible_s > 0

    def to_json(self) -> dict[str, Any]:
        """Every field but the received samples, dataclasses as dicts."""
        from dataclasses import asdict, is_dataclass

        def plain(value: Any) -> Any:
            if isinstance(value, list):
                return [plain(v) for v in value]
            return asdict(value) if is_dataclass(value) else value

        out = {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name != "received"}
        return {**out, "audio_came_back": self.audio_came_back}


# --- the aiortc shell pieces both calls share ----------------------------------------------


class _CallFailed(Exception):
    """A call ended early; str(e) is the report's error line, `step` what failed."""

    def __init__(self, message: str, step: str = "signaling") -> None:
        super().__init__(message)
        self.step = step


class _Signaled(Protocol):
    url: str
    session_url: str | None
    offer_sdp: str | None
    answer_sdp: str | None
    candidates: list
    local_addresses: list[str]


def _tone_frames(freq: float) -> Callable[[int], np.ndarray]:
    def frame_at(pts: int) -> np.ndarray:
        t = (np.arange(FRAME_SAMPLES) + pts) / SAMPLE_RATE
        return (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)

    return frame_at


def _file_frames(signal: np.ndarray) -> Callable[[int], np.ndarray]:
    """Frames of `signal`, then silence."""

    def frame_at(pts: int) -> np.ndarray:
        frame = np.zeros(FRAME_SAMPLES, np.int16)
        part = signal[pts : pts + FRAME_SAMPLES]
        frame[: part.size] = part
        return frame

    return frame_at


def _paced_track(frame_at: Callable[[int], np.ndarray]) -> Any:
    """An aiortc microphone: `frame_at(pts)` (960 int16 samples) every 20 ms on a steady clock
    from the first frame; `.started` resolves to that frame's `time.monotonic()`."""
    from aiortc.mediastreams import MediaStreamTrack
    from av import AudioFrame

    class PacedTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._pts = 0
            self.started: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def recv(self) -> AudioFrame:
            if not self.started.done():
                self.started.set_result(time.monotonic())
            delay = self.started.result() + self._pts / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pcm = frame_at(self._pts)
            frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
            self._pts += FRAME_SAMPLES
            return frame

    return PacedTrack()


def _peer_connection(track: Any) -> Any:
    """An aiortc peer connection sending `track`, without STUN or TURN servers."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(track)
    return pc


def _states(pc: Any) -> tuple[str, str]:
    """The peer connection's ICE and DTLS states."""
    transports = [t.sender.transport for t in pc.getTransceivers() if t.sender.transport]
    return pc.iceConnectionState, transports[0].state if transports else "new"


def _stalled(pc: Any, report: _Signaled, waited: float, media: str) -> _CallFailed:
    """The failure of a call that did not get far enough within `waited` seconds."""
    ice, dtls = _states(pc)
    step = failed_step(ice, dtls)
    line = failure_line(
        step,
        waited,
        candidates=[tuple(c) for c in report.candidates],
        local=report.local_addresses,
        ice_state=ice,
        dtls_state=dtls,
        media=media,
    )
    return _CallFailed(line, step)


def http_session(token: str | None, cafile: Path | None = None) -> aiohttp.ClientSession:
    """The client of signaling: our credential on every request, `cafile` trusted for HTTPS
    (e.g. the certificate `relayctl up --https` made)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    return aiohttp.ClientSession(
        headers=bearer(token), connector=aiohttp.TCPConnector(ssl=context or True)
    )


def unreachable_line(url: str, exc: BaseException) -> str:
    """Why signaling at `url` could not be asked, and what to do."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"signaling at {url} unreachable: its certificate is not trusted "
            f"({exc.certificate_error}); pass --cafile with it "
            "(`relayctl up --https` prints where it is)"
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return f"signaling at {url} unreachable: TLS failed ({exc}); is it https?"
    return (
        f"signaling at {url} unreachable: {exc}; is the stack running (relayctl up) "
        "and the address right?"
    )


def _on_remote_audio(
    pc: Any, on_frame: Callable[[np.ndarray, float], None], errors: list[str]
) -> None:
    """Call `on_frame(mono float64 samples, arrival monotonic time)` for every frame the far
    end sends; a failure in `on_frame` ends the pump and is noted in `errors`."""
    from aiortc.mediastreams import MediaStreamError

    @pc.on("track")
    def on_track(track: Any) -> None:
        async def pump() -> None:
            try:
                while True:
                    frame = await track.recv()
                    pcm = frame.to_ndarray().astype(np.float64)
                    if frame.layout.name != "mono":
                        pcm = pcm.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                    on_frame(pcm.reshape(-1), time.monotonic())
            except MediaStreamError:
                pass
            except Exception as exc:  # reported, not raised into a task nobody awaits
                errors.append(f"receiving audio failed: {exc!r}")

        asyncio.ensure_future(pump())


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for a client token or API key (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


REFUSAL_FIXES = {
    401: "pass a client token or the API key with --token (`relayctl token` mints one)",
    403: "this credential may not place calls: use a client token or the API key",
    429: "too many calls from this address: wait and try again",
    503: "the transceiver is full: try again later",
}


async def _post_offer(http: aiohttp.ClientSession, url: str, offer: str, report: Any) -> str:
    """POST the offer (WHIP): the answer's text, `report.session_url`/`answer_sdp` filled in;
    `_CallFailed` naming the fix for any refusal."""
    async with http.post(
        url.rstrip("/") + "/v1/sessions", data=offer, headers={"Content-Type": "application/sdp"}
    ) as resp:
        body = await resp.text(errors="replace")
        if resp.status != 201:
            fix = REFUSAL_FIXES.get(resp.status)
            raise _CallFailed(
                f"signaling answered {resp.status}: {body.strip()}" + (f"; {fix}" if fix else "")
            )
        location = resp.headers.get("Location")
        if not location:
            raise _CallFailed("signaling answered 201 without a Location header")
        report.session_url = str(resp.url.join(aiohttp.client.URL(location)))
        report.answer_sdp = body
    return body


async def _signal(
    pc: Any,
    http: aiohttp.ClientSession,
    url: str,
    report: _Signaled,
    local_address: str | None = None,
) -> float:
    """Post our offer (WHIP), gather where the answer's candidates are reachable from, and
    apply the answer; returns when the offer was posted (monotonic). Raises `_CallFailed`
    if signaling refuses or no local address can reach the answer's candidates."""
    from aiortc import RTCSessionDescription

    from voicerelay.transceiver.sdp import SdpError, parse_answer

    offer = await pc.createOffer()
    report.offer_sdp = offer.sdp
    posted = time.monotonic()
    body = await _post_offer(http, url, offer.sdp, report)
    not_an_answer = "signaling answered 201 but the body is not an SDP answer"
    try:
        candidates = parse_answer(body).candidates
    except SdpError as exc:
        raise _CallFailed(f"{not_an_answer}: {exc} (body starts {body[:40]!r})") from None
    report.candidates = [list(c) for c in candidates]
    report.local_addresses = gather_plan(
        [host for host, _ in candidates], route_source, local_address
    )
    if not report.local_addresses:
        raise _CallFailed(no_route_line(candidates), "ICE")
    with gathering_from(report.local_addresses):
        await pc.setLocalDescription(offer)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    except Exception as exc:  # aiortc raises ValueError, AssertionError, ... on a bad answer
        raise _CallFailed(
            f"{not_an_answer}: {exc or type(exc).__name__} (body starts {body[:40]!r})"
        ) from None
    return posted


async def _client_rtcp_stats(pc: Any) -> dict[str, Any]:
    """What aiortc learnt from the server's RTCP: loss and RTT of our audio, as reported back."""
    out: dict[str, Any] = {}
    for stat in (await pc.getStats()).values():
        if stat.type == "remote-inbound-rtp":
            out["remote_inbound"] = {
                "packets_lost": stat.packetsLost,
                "fraction_lost": stat.fractionLost,
                "round_trip_time": stat.roundTripTime,
            }
        elif stat.type == "inbound-rtp":
            out["inbound"] = {"packets_received": stat.packetsReceived, "lost": stat.packetsLost}
        elif stat.type == "outbound-rtp":
            out["outbound"] = {"packets_sent": stat.packetsSent}
    return out


async def _hang_up(pc: Any, http: aiohttp.ClientSession, session_url: str, stats: dict) -> None:
    """Collect both sides' statistics into `stats`, then DELETE the session."""
    stats["client"] = await _client_rtcp_stats(pc)
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with http.get(session_url) as resp:
            if resp.status == 200:
                stats["server"] = await resp.json()
    with contextlib.suppress(aiohttp.ClientError):
        async with http.delete(session_url) as resp:
            stats["delete_status"] = resp.status


# --- the tone call ----------------------------------------------------------------------------


async def place_call(
    url: str,
    tone_hz: float = 440.0,
    seconds: float = 2.0,
    timeout: float = 10.0,
    *,
    audio_started: asyncio.Future[CallReport] | None = None,
    token: str | None = None,
    local_address: str | None = None,
    cafile: Path | None = None,
) -> CallReport:
    """One call against the signaling at `url`; never raises for call failures.

    `audio_started`, if given, gets the (unfinished) report once the first echoed audio
    arrives, offer and answer filled in: a caller can act while the call is in progress.
    `local_address` forces where we gather (else: what routes to the answer's candidates);
    `cafile` is trusted for an https `url`.
    """
    report = CallReport(url=url, tone_hz=tone_hz)
    pc = _peer_connection(_paced_track(_tone_frames(tone_hz)))
    received: list[np.ndarray] = []
    arrivals: list[float] = []
    first_audio = asyncio.get_running_loop().create_future()

    def on_frame(pcm: np.ndarray, now: float) -> None:
        if not first_audio.done() and pcm.size and np.abs(pcm).max() > 100:
            first_audio.set_result(now)
        if first_audio.done():
            received.append(pcm)
            arrivals.append(now)

    _on_remote_audio(pc, on_frame, [])
    try:
        async with http_session(token, cafile) as http:
            posted = await _signal(pc, http, url, report, local_address)
            try:
                arrived = await asyncio.wait_for(first_audio, timeout)
            except TimeoutError:
                raise _stalled(pc, report, timeout, "no audio came back") from None
            report.connected = True
            report.setup_ms = (arrived - posted) * 1000
            if audio_started is not None and not audio_started.done():
                audio_started.set_result(report)
            await asyncio.sleep(seconds)
            _judge_tone(report, received, [arrived, *arrivals, time.monotonic()])
            await _hang_up(pc, http, report.session_url or url, report.stats)
    except _CallFailed as exc:
        report.error, report.step = str(exc), exc.step
    except (aiohttp.ClientError, OSError) as exc:
        report.error, report.step = unreachable_line(url, exc), "signaling"
    finally:
        await pc.close()
    return report


def _judge_tone(report: CallReport, received: list[np.ndarray], ticks: list[float]) -> None:
    """Fill in what came back: how much, the longest gap (silence at either end counts too:
    `ticks` is first audio, every arrival, now), its frequency and purity."""
    audio = np.concatenate(received[len(received) // 4 :]) if received else np.zeros(0)
    report.frames_received = len(received)
    report.audio_seconds = sum(p.size for p in received) / SAMPLE_RATE
    report.max_frame_gap_ms = max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) * 1000
    report.received_hz = dominant_frequency(audio)
    report.purity = tone_purity(audio, report.tone_hz)


# --- the played call ------------------------------------------------------------------------


async def place_voice_call(
    url: str,
    play: np.ndarray,
    record: Path | None = None,
    *,
    listen_s: float = 15.0,
    timeout: float = 10.0,
    quiet_s: float = 1.5,
    lead_in_s: float = 0.5,
    token: str | None = None,
    local_address: str | None = None,
    cafile: Path | None = None,
) -> VoiceCallReport:
    """Play `play` (48 kHz mono int16) as the microphone after `lead_in_s` of silence, then
    silence, and listen as `ListenPlan` says; never raises for call failures.

    `timeout` bounds both connecting (our first frame going out) and waiting for any sound
    after the recording ended. `record`, if given, receives what came back as a 48 kHz mono
    WAV on the call's timeline, also when the call fails after media started.
    `local_address` and `cafile` as for `place_call`.
    """
    played = np.concatenate(
        [np.zeros(round(lead_in_s * SAMPLE_RATE), np.int16), np.asarray(play, np.int16).ravel()]
    )
    spoken = find_segments(played)
    plan = ListenPlan(
        played_end_s=played.size / SAMPLE_RATE,
        speech_end_s=spoken[-1].end_s if spoken else 0.0,
        quiet_s=quiet_s,
        listen_s=listen_s,
        timeout_s=timeout,
    )
    report = VoiceCallReport(url=url, played_s=plan.played_end_s, lead_in_s=lead_in_s)
    track = _paced_track(_file_frames(played))
    pc = _peer_connection(track)
    timeline, log, errors = Timeline(), EventLog(), []

    def on_frame(pcm: np.ndarray, now: float) -> None:
        origin = track.started.result() if track.started.done() else now
        timeline.place(np.clip(np.round(pcm), -32768, 32767).astype(np.int16), now - origin)

    _on_remote_audio(pc, on_frame, errors)
    try:
        async with http_session(token, cafile) as http:
            await _converse(pc, http, url, track, timeline, plan, log, report, local_address)
    except _CallFailed as exc:
        report.error, report.step = str(exc), exc.step
    except (aiohttp.ClientError, OSError) as exc:
        report.error, report.step = unreachable_line(url, exc), "signaling"
    finally:
        ended = time.monotonic()
        await pc.close()
        report.error = report.error or (errors[0] if errors else None)
        if report.connected:
            until = ended - track.started.result()
            _conclude(report, played, timeline.samples(until), timeline, log, record)
    return report


async def _converse(
    pc: Any,
    http: aiohttp.ClientSession,
    url: str,
    track: Any,
    timeline: Timeline,
    plan: ListenPlan,
    log: EventLog,
    report: VoiceCallReport,
    local_address: str | None = None,
) -> None:
    """Signal, follow the event stream, play and listen, hang up."""
    posted = await _signal(pc, http, url, report, local_address)
    session_url = report.session_url or url
    events = asyncio.ensure_future(collect_events(http, session_url.rstrip("/") + "/events", log))
    try:
        try:
            started = await asyncio.wait_for(asyncio.shield(track.started), plan.timeout_s)
        except TimeoutError:
            raise _stalled(pc, report, plan.timeout_s, "no audio flowed") from None
        report.connected = True
        report.setup_ms = (started - posted) * 1000
        while (verdict := plan.verdict(time.monotonic() - started, timeline.last_audible_s)) == (
            "listen"
        ):
            await asyncio.sleep(0.02)
        if verdict == "silent":
            report.step = "media"
            report.error = (
                f"media: no audio came back within {plan.timeout_s:g} s after the recording "
                "ended: the call is up but the far end stayed silent; is the agent running "
                "(see relayctl up's output)?"
            )
        await _hang_up(pc, http, session_url, report.stats)
        await asyncio.wait({events}, timeout=1.0)  # the stream ends with the session
    finally:
        events.cancel()


def _conclude(
    report: VoiceCallReport,
    played: np.ndarray,
    received: np.ndarray,
    timeline: Timeline,
    log: EventLog,
    record: Path | None,
) -> None:
    """Fill in the timings, the turns and the conversation; write the recording."""
    analysis = analyse_turns(played, received)
    report.received = received
    report.received_s = received.size / SAMPLE_RATE
    report.audible_s = timeline.audible_samples / SAMPLE_RATE
    report.first_audio_s = timeline.first_audible_s
    report.frames_received = timeline.frames
    report.spoken, report.replies = list(analysis.spoken), list(analysis.replies)
    report.turns, report.overlaps = list(analysis.turns), list(analysis.overlaps)
    report.median_response_ms = analysis.median_response_ms
    report.events, report.events_status = log.events, log.status
    report.transcripts, report.interruptions = conversation(log.events)
    if record is not None:
        try:
            Path(record).write_bytes(encode_wav(received))
            report.recording = str(record)
        except OSError as exc:
            report.error = report.error or f"cannot write {record}: {exc.strerror or exc}"


def describe_voice_call(report: VoiceCallReport) -> str:
    """The human verdict of `relayctl call --play`: one line, then one per turn, transcripts,
    interruptions and the recording."""
    lines = [f"call failed: {report.error}"] if report.error else []
    if report.connected:
        lines.append(_voice_verdict(report))
        lines += [f"  turn {i}: {_describe_turn(t)}" for i, t in enumerate(report.turns, 1)]
        lines += [f'  {t["who"]} said: "{t["text"]}"' for t in report.transcripts]
        lines += [
            f"  agent interrupted after {i.get('sent_ms', '?')} ms of its reply"
            for i in report.interruptions
        ]
    if report.recording:
        lines.append(f"  recording: {report.recording} ({report.received_s:.1f} s, 48 kHz mono)")
    return "\n".join(lines)


def _voice_verdict(report: VoiceCallReport) -> str:
    if not report.audio_came_back:
        return f"audio did NOT come back; setup {report.setup_ms:.0f} ms"
    count = len(report.turns)
    head = f"audio came back: {count} turn{'' if count == 1 else 's'}"
    if not report.spoken:
        head = f"audio came back ({report.audible_s:.1f} s of sound), no speech found in the file"
    elif report.median_response_ms is not None:
        head += f", reply {report.median_response_ms / 1000:.2f} s after you stopped speaking"
        head += " (median)"
    elif any(t.overlap for t in report.turns):
        head += ", the reply overlapped your speech (an echo or a barge-in)"
    else:
        head += ", no reply after you stopped speaking"
    return f"{head}; setup {report.setup_ms:.0f} ms"


def _describe_turn(turn: Turn) -> str:
    you = f"you {turn.spoke_from_s:.2f}-{turn.spoke_to_s:.2f} s"
    if turn.reply_from_s is None or turn.reply_to_s is None or turn.response_ms is None:
        return f"{you}, no reply"
    reply = f"reply {turn.reply_from_s:.2f}-{turn.reply_to_s:.2f} s"
    if turn.overlap:
        early = turn.reply_from_s - turn.spoke_from_s
        return f"{you}, {reply}, began while you spoke ({early:.2f} s after you started)"
    return f"{you}, {reply}, {turn.response_ms / 1000:.2f} s after you stopped"


# --- the tone call over ICE-TCP (`relayctl call --tcp`) -------------------------------------
# aioice (aiortc's ICE) gathers UDP host candidates only (TCP only to reach TURN servers) and
# pairs candidates of one transport, so it never uses an answer's ICE-TCP candidate. A TCP call
# runs on the project's own client-role `Session` (`transceiver.client.ClientCall`) over one
# TCP connection to the relay, RFC 4571-framed: no UDP socket at all.


class FramedTcp(asyncio.Protocol):
    """One TCP connection as a `ClientCall`'s datagram transport: each datagram the call sends
    is one RFC 4571 frame, each frame received a datagram from `remote`."""

    def __init__(
        self, deliver: Callable[[bytes, tuple[str, int]], None], remote: tuple[str, int]
    ) -> None:
        from voicerelay.relay.tcp import FrameDecoder

        self.deliver = deliver
        self.remote = remote
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for datagram in self.decoder.feed(data):
            self.deliver(datagram, self.remote)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(str(exc) if exc else "closed by the relay")

    # What `ClientCall` uses of a datagram transport.
    def sendto(self, data: bytes, addr: Any = None) -> None:
        from voicerelay.relay.tcp import frame

        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpClientCall(ClientCall):
    """A `ClientCall` whose datagrams travel over one framed TCP connection (`FramedTcp`, set
    as its transport by `_tcp_connect`)."""

    def start(self, answer: Any, ufrag: str, pwd: str, remote: tuple[str, int]) -> None:
        """Begin ICE and DTLS towards `remote` (the relay's ICE-TCP candidate), as `connect`
        does over UDP."""
        from voicerelay.transceiver.session import Session

        self.session = Session(
            ice_role="controlling",
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote_ufrag=answer.ice_ufrag,
            remote_pwd=answer.ice_pwd,
            dtls_role="client" if answer.setup == "passive" else "server",
            certificate=self.certificate,
            remote_fingerprint=answer.fingerprint,
            now=self.clock(),
            remote_addr=remote,
            ssrc=self.ssrc,
        )
        self._after_input()


async def _tcp_connect(
    call: TcpClientCall,
    candidates: list[tuple[str, int]],
    local_address: str | None,
    timeout: float,
) -> FramedTcp:
    """A framed TCP connection to the first candidate that accepts one, as `call`'s transport;
    `_CallFailed` (step ICE) naming what was tried if none does."""
    import os

    loop = asyncio.get_running_loop()
    errors = []
    for remote in candidates:
        local = (local_address, 0) if local_address else None
        try:
            _, framed = await asyncio.wait_for(
                loop.create_connection(
                    lambda r=remote: FramedTcp(call.datagram_received, r),
                    *remote,
                    local_addr=local,
                ),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc) or "timed out"
            errors.append(f"{_addrs([remote])}: {why}")
            continue
        call.transport = framed
        return framed
    raise _CallFailed(
        "ICE over TCP failed: no TCP connection to the relay's ICE-TCP candidates "
        f"({'; '.join(errors)}); is the relay's TCP port reachable from this host?",
        "ICE",
    )


@dataclass
class _TcpOffered:
    """What signaling settled for a TCP call: the answer, our ICE credentials, when we posted."""

    answer: Any  # sdp.Answer
    ufrag: str
    pwd: str
    posted: float


async def _tcp_signal(
    http: aiohttp.ClientSession, url: str, report: CallReport, certificate: Any
) -> _TcpOffered:
    """Post a client-role offer and read the answer's ICE-TCP candidates into `report`."""
    import base64
    import os

    from voicerelay.transceiver import sdp

    ufrag = base64.b64encode(os.urandom(6)).decode()
    pwd = base64.b64encode(os.urandom(18)).decode()
    offer = sdp.build_offer(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprint=certificate.fingerprint,
        ssrc=int.from_bytes(os.urandom(4), "big"),
        cname="relayctl-call-tcp",
    )
    report.offer_sdp = offer
    posted = time.monotonic()
    body = await _post_offer(http, url, offer, report)
    try:
        answer = sdp.parse_answer(body)
        tcp = sdp.tcp_candidates(body)
    except sdp.SdpError as exc:
        raise _CallFailed(f"signaling answered 201 but not with an SDP answer: {exc}") from None
    if not tcp:
        raise _CallFailed(
            "the answer lists no ICE-TCP candidate: the stack does not serve TCP "
            "(start it with `relayctl up --tcp-port N`)",
            "ICE",
        )
    report.candidates = [list(c) for c in tcp]
    return _TcpOffered(answer, ufrag, pwd, posted)


class _TcpMedia:
    """The tone out (Opus, 20 ms frames) and what came back, decoded, with arrival times."""

    def __init__(self, call: TcpClientCall, tone_hz: float) -> None:
        from voicerelay.voice.opus import OpusDecoder, OpusEncoder

        self.call = call
        self.frame_at = _tone_frames(tone_hz)
        self.encoder, self.decoder = OpusEncoder(), OpusDecoder()
        self.sent = 0
        self.taken = 0  # packets of call.received decoded so far
        self.received: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.first_audio: float | None = None

    def send_next(self) -> None:
        pts = self.sent * FRAME_SAMPLES
        self.call.send_audio(self.encoder.encode(self.frame_at(pts)), pts)
        self.sent += 1

    def take(self) -> None:
        from voicerelay.transceiver.rtp import RtpError, parse_rtp
        from voicerelay.voice.opus import OpusError

        packets = self.call.received
        for at, packet in packets[self.taken :]:
            try:
                pcm = self.decoder.decode(parse_rtp(packet).payload).astype(np.float64)
            except (RtpError, OpusError):
                continue
            if self.first_audio is None and pcm.size and np.abs(pcm).max() > 100:
                self.first_audio = at
            if self.first_audio is not None:
                self.received.append(pcm)
                self.arrivals.append(at)
        self.taken = len(packets)


async def _tcp_media(
    call: TcpClientCall, framed: FramedTcp, media: _TcpMedia, seconds: float, timeout: float
) -> float:
    """Send the tone every 20 ms until `seconds` after the first echoed audio (returned: when it
    arrived); `_CallFailed` (step media) if none came back within `timeout`, or if the call or
    its connection ended."""
    loop = asyncio.get_running_loop()
    start, secure_at = loop.time(), time.monotonic()
    while True:
        media.take()
        now = time.monotonic()
        if framed.lost.done() or call.closed.done():
            why = framed.lost.result() if framed.lost.done() else call.closed.result()
            raise _CallFailed(f"the call over TCP ended early: {why}", "media")
        if media.first_audio is None and now - secure_at > timeout:
            raise _CallFailed(
                f"no audio came back within {timeout:g} s although ICE and DTLS completed "
                "over TCP: see the transceiver's log",
                "media",
            )
        if media.first_audio is not None and now - media.first_audio >= seconds:
            return media.first_audio
        media.send_next()
        await asyncio.sleep(max(0.0, start + media.sent * 0.02 - loop.time()))


async def _tcp_secure(call: TcpClientCall, framed: FramedTcp, timeout: float) -> None:
    """Wait for ICE and DTLS over the connection; `_CallFailed` naming the step otherwise."""
    lost = asyncio.ensure_future(asyncio.shield(framed.lost))
    try:
        await asyncio.wait(
            {call.secure, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        lost.cancel()
    if call.secure.done() and call.secure.exception() is None:
        return
    step = "ICE" if call.ice_connected_at is None else "DTLS"
    if framed.lost.done():
        why = f"the relay closed the TCP connection ({framed.lost.result()})"
    elif call.secure.done():
        why = f"the session closed ({call.secure.exception()})"
    else:
        why = f"nothing completed within {timeout:g} s"
    what = "no answer to our connectivity checks" if step == "ICE" else "the handshake stalled"
    raise _CallFailed(f"{step} over TCP failed: {why}; {what}", step)


async def place_tcp_call(
    url: str,
    tone_hz: float = 440.0,
    seconds: float = 2.0,
    timeout: float = 10.0,
    *,
    token: str | None = None,
    local_address: str | None = None,
    cafile: Path | None = None,
) -> CallReport:
    """`place_call` over ICE-TCP only: the answer's passive TCP candidate, RFC 4571 framing,
    the project's own client `Session`; never raises for call failures. The report's
    `candidates` are the answer's ICE-TCP ones; a call that fails after signaling is deleted."""
    from voicerelay.transceiver.certificate import Certificate

    report = CallReport(url=url, tone_hz=tone_hz)
    certificate = Certificate.generate()
    call = TcpClientCall(certificate)
    try:
        async with http_session(token, cafile) as http:
            offered = await _tcp_signal(http, url, report, certificate)
            try:
                await _tcp_call(call, report, offered, local_address, seconds, timeout)
            finally:
                await _tcp_hang_up(http, report)
    except _CallFailed as exc:
        report.error, report.step = str(exc), exc.step
    except (aiohttp.ClientError, OSError) as exc:
        report.error, report.step = unreachable_line(url, exc), "signaling"
    finally:
        call.close()
    return report


async def _tcp_call(
    call: TcpClientCall,
    report: CallReport,
    offered: _TcpOffered,
    local_address: str | None,
    seconds: float,
    timeout: float,
) -> None:
    """Connect to the answer's ICE-TCP candidate, run ICE and DTLS, send the tone and judge
    what came back into `report`; `_CallFailed` naming the step otherwise."""
    candidates = [tuple(c) for c in report.candidates]
    framed = await _tcp_connect(call, candidates, local_address, timeout)
    report.local_addresses = [framed.get_extra_info("sockname")[0]]
    call.start(offered.answer, offered.ufrag, offered.pwd, framed.remote)
    await _tcp_secure(call, framed, timeout)
    media = _TcpMedia(call, report.tone_hz)
    first_audio = await _tcp_media(call, framed, media, seconds, timeout)
    report.connected = True
    report.setup_ms = (first_audio - offered.posted) * 1000
    _judge_tone(report, media.received, [first_audio, *media.arrivals, time.monotonic()])
    report.stats["client"] = {"rtp_sent": call.rtp_sent, "rtp_received": call.rtp_received}


async def _tcp_hang_up(http: aiohttp.ClientSession, report: CallReport) -> None:
    """The server's statistics of the call into `report.stats`, then DELETE the session."""
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with http.get(report.session_url) as resp:
            if resp.status == 200:
                report.stats["server"] = await resp.json()
    with contextlib.suppress(aiohttp.ClientError):
        async with http.delete(report.session_url) as resp:
            report.stats["delete_status"] = resp.status
