"""Voice-to-voice latency: voicerelay's own share, stage by stage in process and end to end on
loopback, and barge-in.

Budgets (DESIGN.md): endpointing <= 250 ms after speech ends and everything else together
<= 60 ms (backend compute excluded); barge-in, from the first frame of speech to the last agent
packet sent, <= 100 ms.

(a) In process, on a fake clock: one `CallAudio` (default `AudioConfig`) is fed real Opus packets
    of espeak-ng sentences, one every 20 ms, and the realtime codec frames its audio as the bridge
    does (100 ms appends; at turn end the rest, commit, response.create). At each turn end an
    instant backend's reply (100 ms deltas of a tone, parsed from real event text) is played. Each
    stage is timed with perf_counter around the real objects' calls, over every frame: SRTP
    (a real libsrtp context pair), jitter buffer, Opus decode, VAD + endpointing, resampling,
    bridge framing, pacer, Opus encode. WebSocket transit is timed on a real loopback aiohttp
    socket. Waits and group delays are measured too: the jitter buffer's hold (in order, and
    behind a loss), the endpointing delay after the last voiced frame, soxr's hold-back, the
    pacer's wait before the first frame, the Opus codec's look-ahead.
(b) End to end on loopback: a real call (`Caller`: the project's client-role Session, real Opus
    over DTLS-SRTP) against a real transceiver with a `RealtimeBridge` to bench/echo_backend.py in
    tone mode (on response.create it streams a 0.4 s tone back at once). Per turn: from the last
    voiced frame sent to the first reply packet received, split at the transceiver's `TurnEnded`,
    the backend's response.create arrival and its first audio delta. (b) ~= endpointing + the
    sum of (a)'s critical path.
(c) Barge-in on the same kind of call, the backend answering with 5 s tones: while a reply
    plays the person says a word; from its first voiced frame sent to the last packet of the
    interrupted reply received, and the transceiver's decision time (`Interrupted.at` minus
    `SpeechStarted.at`, the first voiced frame's arrival).

Transceiver, backend and caller share one uvloop loop in this process (one call: no contention).
"Voiced frame" at the caller is a 20 ms frame whose peak is over 500 (tests/support/voice.py).

Run: .venv/bin/python bench/voice_latency.py [--quick] [--turns N] [--barges N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import harness
import numpy as np
import uvloop
from aiohttp import web
from echo_backend import EchoBackend, ReplyConfig

from tests.support.voice import Caller, agent_stack, silence, speech
from voicerelay.transceiver.dtls import SrtpKeys
from voicerelay.transceiver.rtp import RtpPacket
from voicerelay.transceiver.srtp import srtp_context
from voicerelay.voice import realtime
from voicerelay.voice.app import AgentCall
from voicerelay.voice.bridge import BridgeConfig, RealtimeBridge
from voicerelay.voice.events import (
    AudioIn,
    Interrupted,
    SpeechStarted,
    TurnEnded,
    VoiceEvent,
)
from voicerelay.voice.jitter import JitterBuffer
from voicerelay.voice.opus import OpusDecoder, OpusEncoder
from voicerelay.voice.pipeline import MEDIA_RATE, AudioConfig, CallAudio

ENDPOINTING_BUDGET_MS = 250.0
OTHER_BUDGET_MS = 60.0
BARGE_IN_BUDGET_MS = 100.0
FRAME = 960  # 20 ms at 48 kHz
FRAME_S = 0.02
VOICED_PEAK = 500  # a frame whose peak is over this counts as voiced (as `Caller` does)
PT = 111
AGENT_RATE = realtime.REALTIME_RATE
DELTA_MS = 100  # the reply's audio per delta (what the reference agent and most backends send)
BRIDGE = BridgeConfig("ws://unused")  # the bridge's defaults
APPEND_MS = BRIDGE.append_ms
PHRASES = (
    "what is the weather today",
    "please send the report by friday",
    "turn left at the next corner",
    "I would like a large coffee with milk",
    "what time does the train leave",
    "tell me a story about a dragon",
)
BARGE_WORD = "hold on"
REPLY_TONE_S = 0.4  # (b): the instant backend's reply
BARGE_TONE_S = 5.0  # (c): a reply long enough to interrupt


# Timing ----------------------------------------------------------------------------------------
Samples = dict[str, list[float]]  # stage -> seconds per call


def _timed(func: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    perf = time.perf_counter

    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = perf()
        result = func(*args, **kwargs)
        sink.append(perf() - t0)
        return result

    return call


class Timed:
    """A stand-in for one of `CallAudio`'s parts: the named methods are timed into `samples`,
    everything else goes to the real object."""

    def __init__(self, target: Any, samples: Samples, methods: dict[str, str]) -> None:
        self._target = target
        for method, stage in methods.items():
            setattr(self, method, _timed(getattr(target, method), samples[stage]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


STAGE_METHODS: dict[str, dict[str, str]] = {
    "jitter": {"push": "jitter buffer", "pop": "jitter buffer"},
    "decoder": {"decode": "Opus decode", "conceal": "Opus decode", "recover": "Opus decode"},
    "endpointer": {"push": "VAD + endpointing"},
    "to_agent": {"process": "resample in"},
    "from_agent": {"process": "resample out"},
    "pacer": {"enqueue": "pacer", "pop_due": "pacer"},
    "encoder": {"encode": "Opus encode"},
    "sender": {"stamp": "RTP header"},
}


def instrument(audio: CallAudio, samples: Samples) -> None:
    """Time every stage of `audio` (again after it replaced a part, e.g. its resampler; a part
    the call does without, e.g. a resampler when Opus runs at the agent's rate, stays None)."""
    for part, methods in STAGE_METHODS.items():
        target = getattr(audio, part)
        if target is not None and not isinstance(target, Timed):
            setattr(audio, part, Timed(target, samples, methods))


def timing_overhead_us(iterations: int = 20000) -> float:
    """What one `_timed` wrapper adds to a call (microseconds): included in each stage figure."""
    sink: list[float] = []
    noop = _timed(lambda: None, sink)
    t0 = time.perf_counter()
    for _ in range(iterations):
        noop()
    return 1e6 * (time.perf_counter() - t0) / iterations


def us(values: list[float], p: float) -> float:
    return 1e6 * harness.percentile(values, p)


# (a) CallAudio on a fake clock -------------------------------------------------------------------
def rtp_packets(pcm: np.ndarray, first_seq: int, first_ts: int) -> list[bytes]:
    """`pcm` (48 kHz, whole frames) as RTP packets of real Opus, one per 20 ms."""
    encoder = OpusEncoder(MEDIA_RATE)
    return [
        RtpPacket(
            PT,
            (first_seq + i) & 0xFFFF,
            (first_ts + i * FRAME) & 0xFFFFFFFF,
            4242,
            encoder.encode(pcm[i * FRAME : (i + 1) * FRAME]),
        ).serialize()
        for i in range(pcm.size // FRAME)
    ]


def voiced_frames(pcm: np.ndarray) -> list[int]:
    """Indexes of the 20 ms frames a caller counts as voiced."""
    frames = pcm[: pcm.size // FRAME * FRAME].reshape(-1, FRAME)
    return [int(i) for i in np.flatnonzero(np.abs(frames).max(axis=1) > VOICED_PEAK)]


def whole_frames(*parts: np.ndarray) -> np.ndarray:
    pcm = np.concatenate(parts)
    padded = np.zeros(-(-pcm.size // FRAME) * FRAME, np.int16)
    padded[: pcm.size] = pcm
    return padded


def reply_deltas(seconds: float) -> list[str]:
    """An instant backend's reply as event text: 100 ms deltas of a 500 Hz tone."""
    pcm = (
        0.4 * 32767 * np.sin(2 * np.pi * 500 * np.arange(round(seconds * AGENT_RATE)) / AGENT_RATE)
    ).astype("<i2")
    step = AGENT_RATE * DELTA_MS // 1000
    return [
        realtime.server_audio_delta("resp_1", "item_1", pcm[i : i + step].tobytes())
        for i in range(0, pcm.size, step)
    ]


@dataclass
class EndpointRow:
    """One turn on the fake clock (ms)."""

    phrase: str
    speech_s: float
    vad_tail_ms: float  # the VAD's last voiced frame after the caller's last voiced frame
    hangover_ms: float  # the decision after the VAD's last voiced frame
    endpointing_ms: float  # the decision after the caller's last voiced frame
    pacing_wait_ms: float  # reply played -> its first frame due
    splits: int  # turns ended while the phrase was still being said


@dataclass
class FakeClockCall:
    """One `CallAudio` driven like the transceiver drives it: packets arrive at the end of their
    20 ms, the app's timer runs whenever due; what the bridge would do runs in between."""

    audio: CallAudio
    samples: Samples
    now: float = 0.0
    pending: list[np.ndarray] = field(default_factory=list)  # speech not yet appended
    preroll: deque[np.ndarray] = field(
        default_factory=lambda: deque(maxlen=BRIDGE.preroll_ms // 20)
    )
    speaking: bool = False
    played_at: float | None = None
    pacing_waits: list[float] = field(default_factory=list)
    events: list[VoiceEvent] = field(default_factory=list)

    def advance(self, until: float) -> None:
        while (timer := self.audio.next_timer()) is not None and timer <= until:
            self.now = max(self.now, timer)
            t0 = time.perf_counter()
            out = self.audio.handle_timer(self.now)
            if out:
                self.samples["out: CallAudio per frame (total)"].append(time.perf_counter() - t0)
                if self.played_at is not None:
                    self.pacing_waits.append(self.now - self.played_at)
                    self.played_at = None
            self._bridge()
        self.now = until

    def feed(self, packet: bytes) -> None:
        self.advance(self.now + FRAME_S)
        t0 = time.perf_counter()
        self.audio.on_rtp(packet, self.now)
        self.samples["in: CallAudio per packet (total)"].append(time.perf_counter() - t0)
        self._bridge()

    def _bridge(self) -> None:
        """What `RealtimeBridge` does with the events, with its framing timed; at turn end an
        instant backend's reply is parsed and played."""
        samples = self.samples
        for event in self.audio.events():
            if isinstance(event, AudioIn):
                self._hear(event)
                continue
            self.events.append(event)
            if isinstance(event, SpeechStarted):
                self.speaking, self.pending = True, list(self.preroll)
                self.preroll.clear()
            elif isinstance(event, TurnEnded):
                self.speaking = False
                t0 = time.perf_counter()
                self._append()
                realtime.input_audio_commit()
                realtime.response_create()
                samples["bridge up: turn end (rest, commit, create)"].append(
                    time.perf_counter() - t0
                )
                self._play_reply()

    def _hear(self, event: AudioIn) -> None:
        if not self.speaking:
            self.preroll.append(event.pcm)
            return
        self.pending.append(event.pcm)
        if len(self.pending) * 20 >= APPEND_MS:
            t0 = time.perf_counter()
            self._append()
            self.samples[f"bridge up: append {APPEND_MS} ms"].append(time.perf_counter() - t0)

    def _append(self) -> None:
        pcm, self.pending = self.pending, []
        if pcm:
            realtime.input_audio_append(np.concatenate(pcm).tobytes())

    def _play_reply(self) -> None:
        samples = self.samples
        texts = [
            realtime.server_response_created("resp_1"),
            realtime.server_output_item_added("resp_1", "item_1"),
            *reply_deltas(REPLY_TONE_S),
        ]
        self.played_at = self.now
        for text in texts:
            t0 = time.perf_counter()
            event = realtime.parse_server_event(text)
            parsed = time.perf_counter() - t0
            if not isinstance(event, realtime.AudioDelta):
                samples["bridge down: parse created / item added"].append(parsed)
            else:
                samples[f"bridge down: parse delta {DELTA_MS} ms"].append(parsed)
                t0 = time.perf_counter()
                self.audio.play(np.frombuffer(event.pcm, "<i2"), event.item_id, self.now)
                samples[f"out: play {DELTA_MS} ms (resample + enqueue)"].append(
                    time.perf_counter() - t0
                )
        self.audio.finish("item_1", self.now)
        instrument(self.audio, samples)  # finish() replaced the 24k -> 48k resampler


def drive_turns(
    phrases: tuple[str, ...],
    repeats: int,
    config: AudioConfig | None = None,
    snr_db: float | None = None,
) -> tuple[Samples, list[EndpointRow]]:
    """(a): every phrase spoken `repeats` times on one fake-clock call (default `AudioConfig`
    unless given; white noise `snr_db` under the speech if given, else digital silence between
    phrases); stage times, and one endpointing row per phrase. The end of speech is the clean
    signal's last voiced frame."""
    rng = np.random.default_rng(3)
    samples: Samples = defaultdict(list)
    audio = CallAudio(ssrc=1, payload_type=PT, config=config or AudioConfig())
    audio.start(0.0)
    instrument(audio, samples)
    call = FakeClockCall(audio, samples)
    rows: list[EndpointRow] = []
    seq = ts = 0
    for phrase in phrases * repeats:
        said = speech(phrase)
        pcm = whole_frames(silence(0.5), said, silence(0.2 + REPLY_TONE_S + 0.4))
        heard = pcm if snr_db is None else with_noise(pcm, said, snr_db, rng)
        packets = rtp_packets(heard, seq, ts)
        start = call.now
        for packet in packets:
            call.feed(packet)
        spoken_end = start + (voiced_frames(pcm)[-1] + 1) * FRAME_S  # its arrival
        turns = [e for e in call.events if isinstance(e, TurnEnded) and e.at > start]
        final = next((t for t in turns if t.at > spoken_end), None)
        if final is not None:
            rows.append(
                EndpointRow(
                    phrase=phrase,
                    speech_s=said.size / MEDIA_RATE,
                    vad_tail_ms=1000 * (final.speech_ended_at - spoken_end),
                    hangover_ms=1000 * (final.at - final.speech_ended_at),
                    endpointing_ms=1000 * (final.at - spoken_end),
                    pacing_wait_ms=1000 * call.pacing_waits[-1] if call.pacing_waits else 0.0,
                    splits=sum(1 for t in turns if t.at < spoken_end),
                )
            )
        seq, ts = seq + len(packets), ts + len(packets) * FRAME
    return samples, rows


def with_noise(
    pcm: np.ndarray, speech_pcm: np.ndarray, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """`pcm` with white noise `snr_db` under the speech's RMS level."""
    level = float(np.sqrt(np.mean(speech_pcm.astype(np.float64) ** 2)))
    noise = rng.normal(0, level / 10 ** (snr_db / 20), pcm.size)
    return np.clip(pcm + noise, -32768, 32767).astype(np.int16)


def endpointing_sweep(
    hangovers: tuple[int, ...], snrs: tuple[float | None, ...]
) -> list[dict[str, Any]]:
    """Endpointing delay and split turns (fake clock) at other `hangover_ms` settings on clean
    speech, and at the default setting under white noise."""
    settings = [(h, None) for h in hangovers]
    settings += [(AudioConfig().hangover_ms, snr) for snr in snrs if snr is not None]
    out = []
    for hangover, snr in settings:
        _, rows = drive_turns(PHRASES, 1, AudioConfig(hangover_ms=hangover), snr)
        delays = [r.endpointing_ms for r in rows]
        out.append(
            {
                "hangover_ms": hangover,
                "snr_db": snr,
                "endpointing_ms_p50": harness.percentile(delays, 50) if delays else float("nan"),
                "endpointing_ms_max": max(delays, default=float("nan")),
                "splits": sum(r.splits for r in rows),
                "turns": len(rows),
                "missed": len(PHRASES) - len(rows),
            }
        )
    return out


def jitter_holds(frames: int, lost: set[int], wait: float) -> tuple[list[float], list[float]]:
    """A `JitterBuffer` as `CallAudio` drives it (pop at every arrival and at its deadline), on a
    fake clock with packets every 20 ms and the `lost` ones missing. Returns (seconds each
    received frame was held, seconds after its due time each lost frame was released)."""
    buffer = JitterBuffer(wait=wait, frame_samples=FRAME)
    arrival = {i: (i + 1) * FRAME_S for i in range(frames) if i not in lost}
    held: list[float] = []
    concealed: list[float] = []

    def release(now: float) -> None:
        for frame in buffer.pop(now):
            if frame.payload is None:
                concealed.append(now - (frame.seq + 1) * FRAME_S)
            else:
                held.append(now - arrival[frame.seq])

    for seq, at in arrival.items():
        while (deadline := buffer.deadline()) is not None and deadline < at:
            release(deadline)
        buffer.push(seq, seq * FRAME, b"x", at)
        release(at)
    while (deadline := buffer.deadline()) is not None:
        release(deadline)
    return held, concealed


# (a) Group delays --------------------------------------------------------------------------------
def call_parts() -> CallAudio:
    """A fresh call with the default `AudioConfig`: its encoder and resamplers are measured."""
    return CallAudio(ssrc=1, payload_type=PT, config=AudioConfig())


def opus_lookahead_ms() -> float:
    """The Opus codec's algorithmic delay with the call's own encoder (rate and settings),
    measured: a noise burst through it and an `OpusDecoder` at its rate, and the lag of the
    best cross-correlation."""
    parts = call_parts()
    rate, frame = parts.codec_rate, parts.frame
    rng = np.random.default_rng(1)
    pcm = np.zeros(frame * 50, np.int16)
    pcm[frame * 10 : frame * 30] = rng.normal(0, 6000, frame * 20).astype(np.int16)
    encoder, decoder = parts.encoder, OpusDecoder(rate)
    out = np.concatenate(
        [decoder.decode(encoder.encode(pcm[i : i + frame])) for i in range(0, pcm.size, frame)]
    )
    lags = np.arange(0, rate // 50)
    score = [float(np.dot(pcm[: pcm.size - lag], out[lag:].astype(np.float64))) for lag in lags]
    return 1000 * int(lags[int(np.argmax(score))]) / rate


def first_frame_hold_ms(delta_ms: int) -> float:
    """How long after the reply's first delta arrives its first 20 ms frame can go out, when
    deltas of `delta_ms` come in real time through the call's agent -> codec rate resampler: soxr's
    hold-back costs the first frame nothing while a delta carries more than it holds (and with
    no resampler, Opus at the agent's rate, a frame goes as soon as a delta holds 20 ms)."""
    parts = call_parts()
    resampler = parts.from_agent
    chunk = np.full(AGENT_RATE * delta_ms // 1000, 1000, np.int16)
    out = 0
    for k in range(100):
        out += chunk.size if resampler is None else resampler.process(chunk).size
        if out >= parts.frame:
            return k * delta_ms
    return float("nan")


def group_delays() -> dict[str, float]:
    parts = call_parts()
    return {
        "codec_rate": parts.codec_rate,
        "resample_in_ms": 0.0 if parts.to_agent is None else parts.to_agent.delay_ms,
        "resample_out_ms": 0.0 if parts.from_agent is None else parts.from_agent.delay_ms,
        "first_frame_hold_100ms_deltas_ms": first_frame_hold_ms(100),
        "first_frame_hold_20ms_deltas_ms": first_frame_hold_ms(20),
        "opus_lookahead_ms": opus_lookahead_ms(),
    }


# (a) Codec, SRTP and WebSocket costs ----------------------------------------------------------
def srtp_costs(iterations: int) -> Samples:
    """libsrtp through the project's `srtp_context`, a pair keyed as the two ends of a call
    (AEAD_AES_128_GCM, what the project's DTLS offers first)."""
    a, b = os.urandom(28), os.urandom(28)  # 16-byte key + 12-byte salt
    ours = srtp_context(SrtpKeys("AEAD_AES_128_GCM", local=a, remote=b))
    theirs = srtp_context(SrtpKeys("AEAD_AES_128_GCM", local=b, remote=a))
    payload = OpusEncoder(MEDIA_RATE).encode(speech(PHRASES[0])[:FRAME])
    samples: Samples = defaultdict(list)
    for i in range(iterations):
        packet = RtpPacket(PT, i & 0xFFFF, i * FRAME, 7, payload).serialize()
        t0 = time.perf_counter()
        protected = bytes(ours.protect_rtp(packet))
        t1 = time.perf_counter()
        theirs.unprotect_rtp(protected)
        samples["SRTP unprotect"].append(time.perf_counter() - t1)
        samples["SRTP protect"].append(t1 - t0)
    return samples


async def websocket_transit(iterations: int) -> Samples:
    """One-way time of bridge events over a real loopback WebSocket (aiohttp both ends, as the
    bridge and the backends): `send_str` called -> message received at the other end."""
    pcm = (np.arange(AGENT_RATE * APPEND_MS // 1000) % 200).astype("<i2").tobytes()
    up = {
        f"append {APPEND_MS} ms": realtime.input_audio_append(pcm),
        "response.create": realtime.response_create(),
    }
    delta = reply_deltas(DELTA_MS / 1000)[0]
    samples: Samples = defaultdict(list)
    arrivals: asyncio.Queue[float] = asyncio.Queue()
    down_sent: list[float] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            arrived = time.perf_counter()
            if message.data == "down":
                down_sent.append(time.perf_counter())
                await ws.send_str(delta)
            else:
                arrivals.put_nowait(arrived)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{port}/ws", max_msg_size=realtime.MAX_EVENT_BYTES
            ) as ws,
        ):
            for _ in range(iterations):
                for name, text in up.items():
                    t0 = time.perf_counter()
                    await ws.send_str(text)
                    samples[f"bridge up: WebSocket send {name}"].append(time.perf_counter() - t0)
                    samples[f"bridge up: WebSocket transit {name}"].append(
                        await arrivals.get() - t0
                    )
                await ws.send_str("down")
                await ws.receive()
                samples[f"bridge down: WebSocket transit delta {DELTA_MS} ms"].append(
                    time.perf_counter() - down_sent[-1]
                )
    finally:
        await runner.cleanup()
    return samples


# (b), (c) A real call on loopback ----------------------------------------------------------------
@dataclass
class Utterance:
    """What the person said: the frames, and when each went out (time.monotonic())."""

    frames: list[np.ndarray]
    sent_at: list[float] = field(default_factory=list)
    done: asyncio.Future[None] | None = None

    @property
    def voiced_sent_at(self) -> list[float]:
        return [
            at
            for at, f in zip(self.sent_at, self.frames, strict=False)
            if np.abs(f).max() > VOICED_PEAK
        ]


class Voice:
    """The person's microphone on a real call: one Opus frame every 20 ms of the wall clock
    (a fixed schedule), the frames of `say()` when there are some, digital silence otherwise."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.queue: deque[Utterance] = deque()
        self.task: asyncio.Task[None] | None = None
        self._silence = np.zeros(FRAME, np.int16)

    async def __aenter__(self) -> Voice:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def say(self, pcm: np.ndarray) -> Utterance:
        """Speak `pcm` (48 kHz) from the next frame on; returns once its last frame went out."""
        padded = whole_frames(pcm)
        utterance = Utterance([padded[i : i + FRAME] for i in range(0, padded.size, FRAME)])
        utterance.done = asyncio.get_running_loop().create_future()
        self.queue.append(utterance)
        await asyncio.wait_for(utterance.done, len(utterance.frames) * FRAME_S + 5.0)
        return utterance

    async def _run(self) -> None:
        caller = self.caller
        due = time.monotonic()
        while True:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            utterance = self.queue[0] if self.queue else None
            frame = self._silence if utterance is None else utterance.frames[len(utterance.sent_at)]
            sent = time.monotonic()
            caller.call.send_audio(caller.encoder.encode(frame), caller.timestamp)
            caller.timestamp += FRAME
            if utterance is not None:
                utterance.sent_at.append(sent)
                if len(utterance.sent_at) == len(utterance.frames):
                    self.queue.popleft()
                    assert utterance.done is not None
                    utterance.done.set_result(None)
            due += FRAME_S


class TappedCall:
    """An `AgentCall` seen through a tap: every event but audio is logged on its way."""

    def __init__(self, call: AgentCall, log: list[VoiceEvent]) -> None:
        self._call = call
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def events(self) -> AsyncIterator[VoiceEvent]:
        async for event in self._call.events():
            if not isinstance(event, AudioIn):
                self._log.append(event)
            yield event


class TappedAgent:
    """A voice agent (the bridge) whose calls' events are logged with their `at` times."""

    def __init__(self, inner: RealtimeBridge) -> None:
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self.log: list[VoiceEvent] = []

    @property
    def counters(self) -> Any:
        return self.inner.counters

    async def run(self, call: AgentCall) -> None:
        await self.inner.run(cast(AgentCall, TappedCall(call, self.log)))


@dataclass
class Bench:
    """A transceiver bridged to an echo backend in tone mode, one call into it."""

    caller: Caller
    voice: Voice
    agent: TappedAgent
    trace: list[tuple[str, float]]

    def received(self, after: float) -> list[tuple[float, bytes]]:
        return [(at, p) for at, p in self.caller.call.received if at > after]

    def traced(self, what: str, after: float) -> float | None:
        return next((t for w, t in self.trace if w == what and t > after), None)

    def event(self, kind: type, after: float) -> Any:
        return next((e for e in self.agent.log if isinstance(e, kind) and e.at > after), None)

    async def first_packet(self, after: float, timeout: float = 5.0) -> float:
        """Arrival of the first packet with the marker bit (a reply's start) after `after`."""
        deadline = time.monotonic() + timeout
        while True:
            starts = [at for at, p in self.received(after) if p[1] & 0x80]
            if starts:
                return starts[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply within {timeout:g} s")
            await asyncio.sleep(0.01)

    async def quiet(self, seconds: float, timeout: float = 10.0) -> None:
        """Until no packet came for `seconds` (the voice keeps talking silence meanwhile)."""
        await self.caller.wait_quiet(seconds, timeout)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def loopback_call(reply_s: float) -> AsyncIterator[Bench]:
    trace: list[tuple[str, float]] = []
    backend = EchoBackend(ReplyConfig("tone", tone_s=reply_s), lambda w, t: trace.append((w, t)))
    url = await backend.start()
    agent = TappedAgent(RealtimeBridge(BridgeConfig(url)))
    try:
        with tempfile.TemporaryDirectory(prefix="vr-bench-") as tmp:
            async with (
                agent_stack(cast(Any, agent), Path(tmp)) as stack,
                Caller.dial(stack) as caller,
                Voice(caller) as voice,
            ):
                await until(lambda: agent.counters["connections"] >= 1, 5, "the bridge")
                yield Bench(caller, voice, agent, trace)
    finally:
        await backend.stop()


@dataclass
class TurnRow:
    """One turn end to end (ms; from the caller's last voiced frame sent)."""

    phrase: str
    endpointing_ms: float  # -> the transceiver's TurnEnded
    vad_tail_ms: float  # -> the VAD's last voiced frame (TurnEnded.speech_ended_at)
    bridge_up_ms: float  # TurnEnded -> response.create arrived at the backend
    backend_ms: float  # response.create -> its first audio delta sent (backend compute)
    down_ms: float  # first delta sent -> first reply packet received by the caller
    total_ms: float  # last voiced frame sent -> first reply packet received
    ours_ms: float  # total minus the backend's time
    splits: int  # turns ended while the phrase was still being said


async def run_turns(bench: Bench, phrases: list[str]) -> tuple[list[TurnRow], int]:
    """Say each phrase and wait for the reply to play out; (rows, turns that could not be
    timed: no TurnEnded, response or reply seen)."""
    rows, missed = [], 0
    for phrase in phrases:
        said = await bench.voice.say(speech(phrase))
        try:
            first = await bench.first_packet(after=said.voiced_sent_at[-1])
            await bench.quiet(0.25)
        except (TimeoutError, AssertionError) as exc:
            print(f"  turn '{phrase}': {exc}", flush=True)
            missed += 1
            continue
        row = turn_row(bench, phrase, said, first)
        if row is None:
            missed += 1
            continue
        rows.append(row)
        print(
            f"  turn {len(rows):2d}: {row.total_ms:6.1f} ms (endpointing "
            f"{row.endpointing_ms:.1f}, the rest {row.ours_ms - row.endpointing_ms:.1f})",
            flush=True,
        )
    return rows, missed


def turn_row(bench: Bench, phrase: str, said: Utterance, first: float) -> TurnRow | None:
    """One turn's split, from the caller's, transceiver's and backend's timestamps."""
    end = said.voiced_sent_at[-1]
    turn = bench.event(TurnEnded, after=end)
    create = bench.traced("response.create", after=turn.at) if turn is not None else None
    delta = bench.traced("first-delta", after=create) if create is not None else None
    if turn is None or create is None or delta is None:
        return None
    log = bench.agent.log
    ms = 1000.0
    return TurnRow(
        phrase=phrase,
        endpointing_ms=ms * (turn.at - end),
        vad_tail_ms=ms * (turn.speech_ended_at - end),
        bridge_up_ms=ms * (create - turn.at),
        backend_ms=ms * (delta - create),
        down_ms=ms * (first - delta),
        total_ms=ms * (first - end),
        ours_ms=ms * ((first - end) - (delta - create)),
        splits=sum(1 for e in log if isinstance(e, TurnEnded) and said.sent_at[0] < e.at < end),
    )


@dataclass
class BargeRow:
    """One barge-in (ms from the first voiced frame of the interruption, as sent)."""

    last_reply_packet_ms: float  # the interrupted reply's last packet received
    decision_ms: float  # Interrupted.at - SpeechStarted.at (the first voiced frame's arrival)
    interrupted_ms: float  # Interrupted.at
    reply_heard_ms: int  # Interrupted.sent_ms: how much of the reply went out
    packets_after_decision: int  # reply packets that arrived after Interrupted.at


async def run_barge_ins(bench: Bench, count: int, rng: random.Random) -> tuple[list[BargeRow], int]:
    """Talk, then `count` times: let the reply play 0.4-0.9 s and say the barge word (which is
    the next turn, and gets the next reply). (rows, barge-ins that could not be timed)."""
    said = await bench.voice.say(speech(PHRASES[0]))
    utterances: list[Utterance] = []
    for _ in range(count):
        start = await bench.first_packet(after=said.voiced_sent_at[-1])
        listen = start + rng.uniform(0.4, 0.9)  # somewhere in the reply, any frame phase
        await asyncio.sleep(max(0.0, listen - time.monotonic()))
        said = await bench.voice.say(speech(BARGE_WORD))
        utterances.append(said)
    await bench.first_packet(after=said.voiced_sent_at[-1])
    rows = [barge_row(bench, u) for u in utterances]
    return [r for r in rows if r is not None], sum(r is None for r in rows)


def barge_row(bench: Bench, said: Utterance) -> BargeRow | None:
    """None when the reply was not playing as the word began, or no `Interrupted` came."""
    first = said.voiced_sent_at[0]
    cut = bench.event(Interrupted, after=first)
    starts = [at for at, p in bench.received(after=first) if p[1] & 0x80]  # the next reply
    old = [at for at, _ in bench.received(after=first - 1.0) if not starts or at < starts[0]]
    if cut is None or not old or not any(first - 0.05 < at for at in old):
        return None
    started = [e for e in bench.agent.log if isinstance(e, SpeechStarted) and e.at <= cut.at]
    ms = 1000.0
    return BargeRow(
        last_reply_packet_ms=ms * (max(old) - first),
        decision_ms=ms * (cut.at - started[-1].at),
        interrupted_ms=ms * (cut.at - first),
        reply_heard_ms=cut.sent_ms,
        packets_after_decision=sum(1 for at in old if at > cut.at),
    )


# Output ----------------------------------------------------------------------------------------
def p50(values: list[float]) -> float:
    return harness.percentile(values, 50)


def stage_table(samples: Samples, notes: dict[str, str], overhead_us: float) -> str:
    """Every timed stage: CPU per call (us) and the wait or group delay it adds."""
    order = [
        ("in", "SRTP unprotect", "packet"),
        ("in", "jitter buffer", "push/pop"),
        ("in", "Opus decode", "frame"),
        ("in", "VAD + endpointing", "frame"),
        ("in", "resample in", "frame"),
        ("in", "in: CallAudio per packet (total)", "packet"),
        ("up", f"bridge up: append {APPEND_MS} ms", "event"),
        ("up", "bridge up: turn end (rest, commit, create)", "turn"),
        ("up", f"bridge up: WebSocket send append {APPEND_MS} ms", "event"),
        ("up", "bridge up: WebSocket send response.create", "event"),
        ("up", f"bridge up: WebSocket transit append {APPEND_MS} ms", "event"),
        ("up", "bridge up: WebSocket transit response.create", "event"),
        ("down", f"bridge down: WebSocket transit delta {DELTA_MS} ms", "event"),
        ("down", "bridge down: parse created / item added", "event"),
        ("down", f"bridge down: parse delta {DELTA_MS} ms", "event"),
        ("out", f"out: play {DELTA_MS} ms (resample + enqueue)", "delta"),
        ("out", "resample out", "delta"),
        ("out", "pacer", "enqueue/pop"),
        ("out", "Opus encode", "frame"),
        ("out", "RTP header", "frame"),
        ("out", "out: CallAudio per frame (total)", "frame"),
        ("out", "SRTP protect", "packet"),
    ]
    rows = [
        [
            way,
            stage,
            per,
            len(samples.get(stage, [])),
            us(samples.get(stage, []), 50),
            us(samples.get(stage, []), 99),
            notes.get(stage, ""),
        ]
        for way, stage, per in order
    ]
    title = (
        "(a) Stages in process (fake clock, real Opus of espeak speech): CPU per call in us "
        f"(each includes ~{overhead_us:.2f} us of timing wrapper), and the wait or delay it adds"
    )
    return harness.table(
        title, ["way", "stage", "per", "calls", "us p50", "us p99", "wait / group delay"], rows
    )


def resampler_note(delay_ms: float, codec_rate: float) -> str:
    if not delay_ms:
        return f"no resampler: Opus runs at the agent's rate ({codec_rate / 1000:g} kHz)"
    return f"soxr holds {delay_ms:.1f} ms (its delay_ms)"


def stage_notes(
    rows: list[EndpointRow], holds: dict[str, Any], delays: dict[str, float]
) -> dict[str, str]:
    ending = [r.endpointing_ms for r in rows]
    return {
        "jitter buffer": (
            f"hold in order: max {holds['in_order_max_ms']:.0f} ms; behind a loss "
            f"({holds['loss_pct']:.0f} % lost): max {holds['behind_loss_max_ms']:.0f} ms, "
            f"concealed frame out {holds['concealed_p50_ms']:.0f} ms after due (wait "
            f"{1000 * AudioConfig().jitter_wait:.0f} ms)"
        ),
        "VAD + endpointing": (
            f"turn decided {p50(ending):.0f} ms (max {max(ending):.0f}) after the last voiced "
            f"frame: VAD tail {p50([r.vad_tail_ms for r in rows]):.1f} + hangover "
            f"{p50([r.hangover_ms for r in rows]):.0f}"
        ),
        "resample in": resampler_note(delays["resample_in_ms"], delays["codec_rate"])
        + ("; not on the turn's path (TurnEnded precedes it)" if delays["resample_in_ms"] else ""),
        f"out: play {DELTA_MS} ms (resample + enqueue)": (
            resampler_note(delays["resample_out_ms"], delays["codec_rate"])
            + f"; first frame waits {delays['first_frame_hold_100ms_deltas_ms']:.0f} ms with "
            f"100 ms deltas, {delays['first_frame_hold_20ms_deltas_ms']:.0f} ms with 20 ms deltas"
        ),
        "pacer": (
            f"first frame due {p50([r.pacing_wait_ms for r in rows]):.1f} ms after play "
            f"(max {max(r.pacing_wait_ms for r in rows):.1f})"
        ),
        "Opus encode": f"codec look-ahead {delays['opus_lookahead_ms']:.1f} ms (audio, measured)",
    }


def critical_path(samples: Samples) -> list[tuple[str, float]]:
    """(a)'s p50 costs on a turn's path from the deciding packet to the first reply packet, ms."""

    def ms(stage: str, times: int = 1) -> float:
        return times * 1000 * p50(samples[stage])

    return [
        (
            "in: SRTP unprotect + CallAudio of the deciding packet",
            ms("SRTP unprotect") + ms("in: CallAudio per packet (total)"),
        ),
        (
            "bridge up: rest + commit + create, framed",
            ms("bridge up: turn end (rest, commit, create)"),
        ),
        (
            "bridge up: WebSocket send + transit of response.create",
            ms("bridge up: WebSocket transit response.create"),
        ),
        (
            "bridge down: WebSocket transit of the first delta",
            ms(f"bridge down: WebSocket transit delta {DELTA_MS} ms"),
        ),
        (
            "bridge down: parse created, item, first delta",
            ms("bridge down: parse created / item added", 2)
            + ms(f"bridge down: parse delta {DELTA_MS} ms"),
        ),
        (f"out: play the first {DELTA_MS} ms", ms(f"out: play {DELTA_MS} ms (resample + enqueue)")),
        (
            "out: CallAudio of the first frame + SRTP protect",
            ms("out: CallAudio per frame (total)") + ms("SRTP protect"),
        ),
    ]


def path_table(path: list[tuple[str, float]], rows: list[EndpointRow], turns: list[TurnRow]) -> str:
    ending = p50([r.endpointing_ms for r in rows])
    summed = sum(v for _, v in path)
    lines: list[list[Any]] = [[what, value] for what, value in path]
    lines += [
        ["= sum of (a) beside endpointing", summed],
        ["+ endpointing after the last voiced frame, (a) p50", ending],
        ["= (a) predicted voice-to-voice share, p50", ending + summed],
        [
            "(b) measured, p50: last voiced frame sent -> first reply packet",
            p50([t.total_ms for t in turns]),
        ],
        [
            "(b) measured minus endpointing, p50 (voicerelay's part beside it)",
            p50([t.ours_ms - t.endpointing_ms for t in turns]),
        ],
    ]
    title = (
        "(a) -> (b): a turn's critical path, ms (p50 stage costs; (b) adds the event loop's "
        "hand-offs: agent queue, reader task, timer)"
    )
    return harness.table(title, ["step", "ms"], lines)


def turn_table(turns: list[TurnRow], hangover_ms: int) -> str:
    headers = [
        "phrase",
        "endpointing",
        "(VAD tail)",
        "bridge up",
        "backend",
        "down",
        "total",
        "ours",
        "splits",
    ]
    rows = [
        [
            t.phrase,
            t.endpointing_ms,
            t.vad_tail_ms,
            t.bridge_up_ms,
            t.backend_ms,
            t.down_ms,
            t.total_ms,
            t.ours_ms,
            t.splits,
        ]
        for t in turns
    ]
    cols = (
        "endpointing_ms",
        "vad_tail_ms",
        "bridge_up_ms",
        "backend_ms",
        "down_ms",
        "total_ms",
        "ours_ms",
    )
    for name, pick in (("p50", p50), ("max", max)):
        rows.append([name, *(pick([getattr(t, c) for t in turns]) for c in cols), ""])
    title = (
        "(b) End to end on loopback, ms from the last voiced frame sent (real call, real "
        f"transceiver, instant backend; hangover {hangover_ms} ms): endpointing -> TurnEnded, "
        "bridge up -> response.create at the backend, backend -> its first delta sent, down -> "
        "first reply packet at the caller; ours = total - backend"
    )
    return harness.table(title, headers, rows)


def barge_table(barges: list[BargeRow]) -> str:
    headers = [
        "#",
        "last reply packet",
        "decision (trx)",
        "Interrupted",
        "reply heard ms",
        "arrived after decision",
    ]
    rows: list[list[Any]] = [
        [
            i + 1,
            b.last_reply_packet_ms,
            b.decision_ms,
            b.interrupted_ms,
            b.reply_heard_ms,
            b.packets_after_decision,
        ]
        for i, b in enumerate(barges)
    ]
    for name, pick in (("p50", p50), ("max", max)):
        rows.append(
            [
                name,
                pick([b.last_reply_packet_ms for b in barges]),
                pick([b.decision_ms for b in barges]),
                pick([b.interrupted_ms for b in barges]),
                "",
                "",
            ]
        )
    title = (
        f"(c) Barge-in, ms from the first voiced frame of '{BARGE_WORD}' sent: the interrupted "
        "reply's last packet received; the transceiver's decision (Interrupted - SpeechStarted, "
        f"start_ms {AudioConfig().start_ms}); Interrupted itself"
    )
    return harness.table(title, headers, rows)


def summarize(
    rows: list[EndpointRow],
    b: dict[str, Any],
    path: list[tuple[str, float]],
    delays: dict[str, float],
) -> dict[str, Any]:
    """The figures against the budgets; `b` is what `on_loopback` returned."""
    turns, barges = b["turns"], b["barges"]
    a_ending = [r.endpointing_ms for r in rows]
    b_ending = [t.endpointing_ms for t in turns]
    b_rest = [t.ours_ms - t.endpointing_ms + delays["opus_lookahead_ms"] for t in turns]
    return {
        "endpointing_budget_ms": ENDPOINTING_BUDGET_MS,
        "endpointing_ms_a_p50": p50(a_ending),
        "endpointing_ms_a_max": max(a_ending),
        "endpointing_ms_b_p50": p50(b_ending),
        "endpointing_ms_b_max": max(b_ending),
        "hangover_ms": AudioConfig().hangover_ms,
        "vad_tail_ms_p50": p50([r.vad_tail_ms for r in rows]),
        "other_budget_ms": OTHER_BUDGET_MS,
        "other_ms_a_sum": sum(v for _, v in path) + delays["opus_lookahead_ms"],
        "other_ms_b_p50": p50(b_rest),
        "other_ms_b_max": max(b_rest),
        "predicted_ms_a": p50(a_ending) + sum(v for _, v in path),
        "measured_ms_b_p50": p50([t.total_ms for t in turns]),
        "measured_ms_b_max": max(t.total_ms for t in turns),
        "barge_in_budget_ms": BARGE_IN_BUDGET_MS,
        "barge_in_ms_p50": p50([b.last_reply_packet_ms for b in barges]),
        "barge_in_ms_max": max(b.last_reply_packet_ms for b in barges),
        "barge_in_decision_ms_p50": p50([b.decision_ms for b in barges]),
        "barge_in_decision_ms_max": max(b.decision_ms for b in barges),
        "barge_ins": len(barges),
        "missed_barge_ins": b["missed_barges"],
        "turns": len(turns),
        "missed_turns": b["missed_turns"],
    }


def summary_table(s: dict[str, Any]) -> str:
    def met(p50_ms: float, max_ms: float, budget: float) -> str:
        verdict = "yes" if max_ms <= budget else "p50 only" if p50_ms <= budget else "NO"
        return f"p50 {p50_ms / budget:.2f}x, max {max_ms / budget:.2f}x budget: {verdict}"

    rows = [
        [
            f"endpointing <= {s['endpointing_budget_ms']:.0f} ms after speech ends",
            f"(a) p50 {s['endpointing_ms_a_p50']:.0f} / max {s['endpointing_ms_a_max']:.0f}; "
            f"(b) p50 {s['endpointing_ms_b_p50']:.0f} / max {s['endpointing_ms_b_max']:.0f} "
            f"over {s['turns']} turns ({s['missed_turns']} not timed); hangover "
            f"{s['hangover_ms']} + VAD tail {s['vad_tail_ms_p50']:.1f}",
            met(s["endpointing_ms_b_p50"], s["endpointing_ms_b_max"], s["endpointing_budget_ms"]),
        ],
        [
            f"everything else <= {s['other_budget_ms']:.0f} ms (with Opus look-ahead)",
            f"(a) sum {s['other_ms_a_sum']:.1f}; (b) p50 {s['other_ms_b_p50']:.1f} / max "
            f"{s['other_ms_b_max']:.1f}",
            met(s["other_ms_b_p50"], s["other_ms_b_max"], s["other_budget_ms"]),
        ],
        [
            "(b) ~= endpointing + sum of (a)",
            f"predicted {s['predicted_ms_a']:.1f}; measured p50 {s['measured_ms_b_p50']:.1f} / "
            f"max {s['measured_ms_b_max']:.1f}",
            "",
        ],
        [
            f"barge-in <= {s['barge_in_budget_ms']:.0f} ms (first speech frame -> last agent "
            "packet)",
            f"p50 {s['barge_in_ms_p50']:.1f} / max {s['barge_in_ms_max']:.1f} over "
            f"{s['barge_ins']} ({s['missed_barge_ins']} not timed); transceiver decision p50 {s['barge_in_decision_ms_p50']:.1f} / "
            f"max {s['barge_in_decision_ms_max']:.1f}",
            met(s["barge_in_ms_p50"], s["barge_in_ms_max"], s["barge_in_budget_ms"]),
        ],
    ]
    return harness.table("Voice latency against the budgets", ["budget", "measured ms", ""], rows)


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    rows = [
        [
            s["hangover_ms"],
            "clean" if s["snr_db"] is None else f"{s['snr_db']:g} dB",
            s["endpointing_ms_p50"],
            s["endpointing_ms_max"],
            s["splits"],
            s["missed"],
            s["turns"],
        ]
        for s in sweep
    ]
    return harness.table(
        "(a) Endpointing (ms after the clean signal's last voiced frame) at other hangover_ms "
        "settings, and under white noise at the default (fake clock; splits: a turn ended "
        "inside a phrase; missed: no turn end after it)",
        ["hangover_ms", "noise", "endpointing p50", "max", "splits", "missed", "turns"],
        rows,
    )


# Main -------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and iterations")
    parser.add_argument("--turns", type=int, default=None, help="(b) turns [12; quick 4]")
    parser.add_argument("--barges", type=int, default=None, help="(c) barge-ins [12; quick 5]")
    args = parser.parse_args()
    args.turns = args.turns or (4 if args.quick else 12)
    args.barges = args.barges or (5 if args.quick else 12)
    args.repeats = 1 if args.quick else 3
    args.iterations = 100 if args.quick else 500
    return args


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """(a): stages, waits and group delays."""
    samples, rows = drive_turns(PHRASES, args.repeats)
    samples.update(srtp_costs(args.iterations * 20))
    samples.update(uvloop.run(websocket_transit(args.iterations)))
    loss_pct = 4.0
    lost = set(range(12, 500, round(100 / loss_pct)))
    in_order, _ = jitter_holds(500, set(), AudioConfig().jitter_wait)
    behind, concealed = jitter_holds(500, lost, AudioConfig().jitter_wait)
    holds = {
        "in_order_max_ms": 1000 * max(in_order),
        "loss_pct": loss_pct,
        "behind_loss_max_ms": 1000 * max(behind),
        "concealed_p50_ms": 1000 * p50(concealed),
    }
    return {
        "samples": samples,
        "rows": rows,
        "holds": holds,
        "delays": group_delays(),
        "sweep": endpointing_sweep((100, 150, 200, 240), (30.0, 20.0, 10.0)),
        "overhead_us": timing_overhead_us(),
    }


async def on_loopback(args: argparse.Namespace) -> dict[str, Any]:
    """(b) and (c)."""
    phrases = [PHRASES[i % len(PHRASES)] for i in range(args.turns)]
    print(f"(b) {args.turns} turns on a real call", flush=True)
    async with loopback_call(REPLY_TONE_S) as bench:
        turns, missed_turns = await run_turns(bench, phrases)
    print(f"(c) {args.barges} barge-ins", flush=True)
    async with loopback_call(BARGE_TONE_S) as bench:
        barges, missed_barges = await run_barge_ins(bench, args.barges, random.Random(7))
    if not turns or not barges:
        raise SystemExit("voice_latency: no turn or no barge-in could be timed (see above)")
    return {
        "turns": turns,
        "barges": barges,
        "missed_turns": missed_turns,
        "missed_barges": missed_barges,
    }


def main() -> None:
    args = parse_args()
    info = harness.machine()
    started = time.monotonic()
    driver, _ = harness.cores()
    harness.pin(os.getpid(), driver)
    print("(a) stages in process", flush=True)
    a = in_process(args)
    b = uvloop.run(on_loopback(args))
    path = critical_path(a["samples"])
    summary = summarize(a["rows"], b, path, a["delays"])
    notes = stage_notes(a["rows"], a["holds"], a["delays"])
    figures = {
        "quick": args.quick,
        "summary": summary,
        "stages_us": {
            stage: {"calls": len(v), "p50": us(v, 50), "p99": us(v, 99)}
            for stage, v in sorted(a["samples"].items())
        },
        "timing_overhead_us": a["overhead_us"],
        "jitter_holds": a["holds"],
        "group_delays_ms": a["delays"],
        "endpointing_a": [asdict(r) for r in a["rows"]],
        "endpointing_sweep": a["sweep"],
        "critical_path_ms": dict(path),
        "turns_b": [asdict(t) for t in b["turns"]],
        "barge_ins": [asdict(x) for x in b["barges"]],
        "seconds": time.monotonic() - started,
    }
    tables = [
        stage_table(a["samples"], notes, a["overhead_us"]),
        sweep_table(a["sweep"]),
        turn_table(b["turns"], AudioConfig().hangover_ms),
        path_table(path, a["rows"], b["turns"]),
        barge_table(b["barges"]),
        summary_table(summary),
    ]
    harness.report("voice_latency", tables, figures, info)


if __name__ == "__main__":
    main()
