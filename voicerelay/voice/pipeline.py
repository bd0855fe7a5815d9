"""`CallAudio`: the voice app of a decoded-audio call, sans-IO.

    audio.on_rtp(packet, now)        # plain RTP in (from the Session): jitter buffer, decode,
                                     # endpointing, resampling; [] (output is paced by timer)
    audio.next_timer() / handle_timer(now) -> [RTP]   # losses released, one paced frame out
    audio.play(pcm, item_id, now)    # agent audio at the agent's rate, queued
    audio.finish(item_id)            # no more audio for that item
    audio.events()                   # CallStarted, AudioIn, SpeechStarted, TurnEnded, ...

The Session treats it like any `VoiceApp`; `moves_timer` tells the server that incoming media
can move this app's timer (a loss waiting in the jitter buffer), so it reschedules after media.
Barge-in lives here, next to the queue it empties: when the endpointer hears the person start
while an agent item is playing, the queued frames are dropped before the next one is due and
`Interrupted` says how much of that item went out. A new item whose audio arrives while the
person is speaking (a reply to a turn they have since gone on with) is refused the same way,
with `sent_ms` 0: the person has the floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voicerelay.transceiver.apps import RtpSender
from voicerelay.transceiver.rtp import RtpError, parse_rtp, plain_header_size
from voicerelay.voice.endpoint import DEFAULT_HANGOVER_MS, Endpointer
from voicerelay.voice.events import (
    AudioIn,
    CallEnded,
    CallStarted,
    Interrupted,
    PlaybackDone,
    SpeechStarted,
    VoiceEvent,
)
from voicerelay.voice.jitter import JitterBuffer, JitterFrame
from voicerelay.voice.opus import OpusDecoder, OpusEncoder, OpusError
from voicerelay.voice.pacer import Pacer
from voicerelay.voice.resample import Resampler

MEDIA_RATE = 48000  # Opus's RTP clock, and the rate everything inside a call runs at
FRAME_SAMPLES = MEDIA_RATE // 50  # 20 ms


@dataclass
class AudioConfig:
    """Knobs of the decoded-audio path (defaults meet the design's latency budgets)."""

    agent_rate: int = 24000  # what the agent hears and speaks
    jitter_wait: float = 0.04  # how long a gap waits for a late packet before concealment
    vad_aggressiveness: int = 2  # webrtcvad 0 (lenient) .. 3 (strict)
    start_ms: int = 60  # voiced audio needed to call it speech (barge-in needs it too)
    hangover_ms: int = DEFAULT_HANGOVER_MS  # silence that ends a turn (decided <= 250 ms after)
    bitrate: int = 32000
    complexity: int = 1  # 50 us a frame (5: 141 us) for >= 200 calls a core; fine for speech
    resample_quality: str = "LQ"  # soxr: ~11 ms held back each way (MQ: ~21 ms), flat to 0.8 fs/2


class CallAudio:
    """Decoded audio in, paced encoded audio out, for one call."""

    moves_timer = True

    def __init__(self, *, ssrc: int, payload_type: int, config: AudioConfig | None = None) -> None:
        self.config = cfg = config or AudioConfig()
        self.payload_type = payload_type
        self.sender = RtpSender(ssrc)
        self.jitter = JitterBuffer(wait=cfg.jitter_wait, frame_samples=FRAME_SAMPLES)
        self.decoder = OpusDecoder(MEDIA_RATE)
        self.encoder = OpusEncoder(MEDIA_RATE, bitrate=cfg.bitrate, complexity=cfg.complexity)
        self.endpointer = Endpointer(
            sample_rate=MEDIA_RATE,
            aggressiveness=cfg.vad_aggressiveness,
            start_ms=cfg.start_ms,
            hangover_ms=cfg.hangover_ms,
        )
        self.to_agent = Resampler(MEDIA_RATE, cfg.agent_rate, cfg.resample_quality)
        self.from_agent = self._new_from_agent()
        self.pacer = Pacer(rate=MEDIA_RATE, frame_samples=FRAME_SAMPLES)
        self._agent_frame = cfg.agent_rate // 50
        self._held = np.zeros(0, dtype=np.int16)  # resampled audio short of a whole frame
        self.playing: str | None = None  # the agent item being played (until done or cut)
        self.refused: str | None = None  # an item that arrived while the person was speaking
        self.started = False
        self.ended = False
        self.counters = {"decode_errors": 0, "malformed_rtp": 0, "concealed": 0, "recovered": 0}
        self._events: list[VoiceEvent] = []

    # Call lifecycle ---------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Media is up (DTLS connected): the agent may listen and speak from now on."""
        if not self.started:
            self.started = True
            self._events.append(CallStarted(now, self.config.agent_rate))

    def end(self, now: float, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self._events.append(CallEnded(now, reason))

    def events(self) -> list[VoiceEvent]:
        out, self._events = self._events, []
        return out

    # Incoming audio ---------------------------------------------------------------------------
    def on_rtp(self, packet: bytes, now: float) -> list[bytes]:
        header = plain_header_size(packet)
        if header < 0:  # padded or malformed: the slow parser decides
            try:
                rtp = parse_rtp(packet)
            except RtpError:
                self.counters["malformed_rtp"] += 1
                return []
            seq, timestamp, payload = rtp.sequence, rtp.timestamp, rtp.payload
        else:
            seq = (packet[2] << 8) | packet[3]
            timestamp = int.from_bytes(packet[4:8], "big")
            payload = packet[header:]
        self.jitter.push(seq, timestamp, payload, now)
        self._hear_ready(now)
        return []

    def _hear_ready(self, now: float) -> None:
        for frame in self.jitter.pop(now):
            pcm = self._decode(frame)
            if pcm is not None:
                self._hear(pcm, now)

    def _decode(self, frame: JitterFrame) -> np.ndarray | None:
        decoder = self.decoder
        try:
            if frame.payload is not None:
                return decoder.decode(frame.payload)
            if frame.following is not None and decoder.has_fec(frame.following):
                self.counters["recovered"] += 1
                return decoder.recover(frame.following, FRAME_SAMPLES)
            self.counters["concealed"] += 1
            return decoder.conceal(FRAME_SAMPLES)
        except OpusError:
            self.counters["decode_errors"] += 1
            return None

    def _hear(self, pcm: np.ndarray, now: float) -> None:
        events = self._events
        for start in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            frame = pcm[start : start + FRAME_SAMPLES]
            voiced, turn_events = self.endpointer.push(frame, now)
            for event in turn_events:
                if isinstance(event, SpeechStarted) and self.playing is not None:
                    item, sent_ms = self._cut(now)
                    events.append(Interrupted(now, item, sent_ms))
                events.append(event)
            if self.started:
                self._to_agent(frame, voiced, now)

    def _to_agent(self, frame: np.ndarray, voiced: bool, now: float) -> None:
        """Resampled audio out in whole 20 ms frames (the resampler's output comes in
        uneven pieces)."""
        held = self.to_agent.process(frame)
        if self._held.size:
            held = np.concatenate((self._held, held))
        size = self._agent_frame
        while held.size >= size:
            self._events.append(AudioIn(now, held[:size], voiced))
            held = held[size:]
        self._held = held

    # Outgoing audio ---------------------------------------------------------------------------
    def play(self, pcm: np.ndarray, item_id: str | None, now: float) -> None:
        """Queue agent audio (int16 at the agent's rate); it goes out one frame per 20 ms."""
        if self.ended or not len(pcm) or item_id == self.refused:
            return
        if self.playing != item_id:
            if self.endpointer.speaking:
                self.refused = item_id
                self._events.append(Interrupted(now, item_id, 0))
                return
            self.playing = item_id
        self.pacer.enqueue(self.from_agent.process(pcm), item_id, now)

    def finish(self, item_id: str | None, now: float) -> None:
        """No more audio for `item_id`: its last partial frame is padded and played."""
        if self.playing != item_id:
            return
        tail = self.from_agent.flush()
        if len(tail):
            self.pacer.enqueue(tail, item_id, now)
        self.pacer.finish(item_id)
        self.from_agent = self._new_from_agent()
        self._collect_done(now)

    def interrupt(self, now: float) -> tuple[str | None, int]:
        """The agent's own cancel: drop what is queued; (item, ms of it sent)."""
        return self._cut(now)

    def _new_from_agent(self) -> Resampler:
        return Resampler(self.config.agent_rate, MEDIA_RATE, self.config.resample_quality)

    def _cut(self, now: float) -> tuple[str | None, int]:
        item, sent_ms = self.pacer.clear()
        item = item if item is not None else self.playing
        self.playing = None
        self.from_agent = self._new_from_agent()
        return item, sent_ms

    def _collect_done(self, now: float) -> None:
        for item, sent_ms in self.pacer.done_items():
            if item == self.playing:
                self.playing = None
            self._events.append(PlaybackDone(now, item, sent_ms))

    # Timers -----------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        loss, due = self.jitter.deadline(), self.pacer.next_due()
        if loss is None:
            return due
        return loss if due is None else min(loss, due)

    def handle_timer(self, now: float) -> list[bytes]:
        self._hear_ready(now)
        frame = self.pacer.pop_due(now)
        if frame is None:
            return []
        payload = self.encoder.encode(frame.pcm)
        packet = self.sender.stamp(self.payload_type, frame.timestamp, payload, frame.marker)
        self._collect_done(now)
        return [packet]

    @property
    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            **{f"jitter_{k}": v for k, v in self.jitter.counters.items()},
            **{f"pacer_{k}": v for k, v in self.pacer.counters.items()},
            **{f"vad_{k}": v for k, v in self.endpointer.counters.items()},
        }
