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

The pure parts (WAV codec, timeline, listening plan, event-stream parser) take bytes, arrays
and times; only the `place_*` shells read clocks and use sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import math
import struct
import time
from collections.abc import Callable
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

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


def loopback_only_ice() -> None:
    """Make aioice gather only 127.0.0.1 (it skips loopback by default)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]


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
    session_url: str | None = None
    offer_sdp: str | None = None
    answer_sdp: str | None = None
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
    session_url: str | None = None
    offer_sdp: str | None = None
    answer_sdp: str | None = None
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
    """A call ended early; str(e) is the report's error line."""


class _Signaled(Protocol):
    session_url: str | None
    offer_sdp: str | None
    answer_sdp: str | None


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
    """A loopback-only aiortc peer connection sending `track`."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    loopback_only_ice()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(track)
    return pc


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


async def _signal(pc: Any, http: aiohttp.ClientSession, url: str, report: _Signaled) -> float:
    """Post our offer (WHIP) and apply the answer; returns when the offer was posted
    (monotonic). Raises `_CallFailed` if signaling refuses."""
    from aiortc import RTCSessionDescription

    await pc.setLocalDescription(await pc.createOffer())
    report.offer_sdp = pc.localDescription.sdp
    posted = time.monotonic()
    async with http.post(
        url.rstrip("/") + "/v1/sessions",
        data=pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp"},
    ) as resp:
        body = await resp.text(errors="replace")
        if resp.status != 201:
            raise _CallFailed(f"signaling answered {resp.status}: {body.strip()}")
        location = resp.headers.get("Location")
        if not location:
            raise _CallFailed("signaling answered 201 without a Location header")
        report.session_url = str(resp.url.join(aiohttp.client.URL(location)))
        report.answer_sdp = body
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    except Exception as exc:  # aiortc raises ValueError, AssertionError, ... on a bad answer
        raise _CallFailed(
            "signaling answered 201 but the body is not an SDP answer: "
            f"{exc or type(exc).__name__} (body starts {body[:40]!r})"
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
) -> CallReport:
    """One call against the signaling at `url`; never raises for call failures.

    `audio_started`, if given, gets the (unfinished) report once the first echoed audio
    arrives, offer and answer filled in: a caller can act while the call is in progress.
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
        async with aiohttp.ClientSession(headers=bearer(token)) as http:
            posted = await _signal(pc, http, url, report)
            try:
                arrived = await asyncio.wait_for(first_audio, timeout)
            except TimeoutError:
                raise _CallFailed(
                    f"no audio came back within {timeout:g} s (state {pc.connectionState})"
                ) from None
            report.connected = True
            report.setup_ms = (arrived - posted) * 1000
            if audio_started is not None and not audio_started.done():
                audio_started.set_result(report)
            await asyncio.sleep(seconds)
            _judge_tone(report, received, [arrived, *arrivals, time.monotonic()])
            await _hang_up(pc, http, report.session_url or url, report.stats)
    except _CallFailed as exc:
        report.error = str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        report.error = f"signaling at {url} unreachable: {exc}"
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
) -> VoiceCallReport:
    """Play `play` (48 kHz mono int16) as the microphone after `lead_in_s` of silence, then
    silence, and listen as `ListenPlan` says; never raises for call failures.

    `timeout` bounds both connecting (our first frame going out) and waiting for any sound
    after the recording ended. `record`, if given, receives what came back as a 48 kHz mono
    WAV on the call's timeline, also when the call fails after media started.
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
        async with aiohttp.ClientSession(headers=bearer(token)) as http:
            await _converse(pc, http, url, track, timeline, plan, log, report)
    except _CallFailed as exc:
        report.error = str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        report.error = f"signaling at {url} unreachable: {exc}"
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
) -> None:
    """Signal, follow the event stream, play and listen, hang up."""
    posted = await _signal(pc, http, url, report)
    session_url = report.session_url or url
    events = asyncio.ensure_future(collect_events(http, session_url.rstrip("/") + "/events", log))
    try:
        try:
            started = await asyncio.wait_for(asyncio.shield(track.started), plan.timeout_s)
        except TimeoutError:
            raise _CallFailed(
                f"no audio flowed within {plan.timeout_s:g} s (state {pc.connectionState})"
            ) from None
        report.connected = True
        report.setup_ms = (started - posted) * 1000
        while (verdict := plan.verdict(time.monotonic() - started, timeline.last_audible_s)) == (
            "listen"
        ):
            await asyncio.sleep(0.02)
        if verdict == "silent":
            report.error = (
                f"no audio came back within {plan.timeout_s:g} s after the recording ended"
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
