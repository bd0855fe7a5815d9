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

MEDIA_RATE = 48000  # Opus's RTP clock
FRAME_SAMPLES = MEDIA_RATE // 50  # 20 ms on the RTP clock
# Rates libopus decodes to and encodes from natively: an agent at one of them needs no
# resampler either way (less CPU, and ~11 ms less delay each way); webrtcvad takes 8/16/48 kHz
# as they are and 24 kHz averaged down to 8 kHz (what it does inside with 48 kHz anyway).
OPUS_RATES = (8000, 16000, 24000, 48000)
VAD_DECIMATION = {8000: 1, 16000: 1, 24000: 3, 48000: 1}


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
    resample_quality: str = "LQ"  # soxr, for agent rates Opus lacks: ~11 ms held back each way


class CallAudio:
    """Decoded audio in, paced encoded audio out, for one call."""

    moves_timer = True

    def __init__(self, *, ssrc: int, payload_type: int, config: AudioConfig | None = None) -> None:
        self.config = cfg = config or AudioConfig()
        self.payload_type = payload_type
        self.sender = RtpSender(ssrc)
        self.jitter = JitterBuffer(wait=cfg.jitter_wait, frame_samples=FRAME_SAMPLES)
        # The codec runs at the agent's rate where libopus can; else at 48 kHz with resamplers.
        self.codec_rate = rate = cfg.agent_rate if cfg.agent_rate in OPUS_RATES else MEDIA_RATE
        self.frame = rate // 50  # samples in 20 ms at the codec's rate
        self.decoder = OpusDecoder(rate)
        self.encoder = OpusEncoder(rate, bitrate=cfg.bitrate, complexity=cfg.complexity)
        self._vad_step = VAD_DECIMATION[rate]
        self.endpointer = Endpointer(
            sample_rate=rate // self._vad_step,
            aggressiveness=cfg.vad_aggressiveness,
            start_ms=cfg.start_ms,
            hangover_ms=cfg.hangover_ms,
        )
        self.to_agent = self._resampler(rate, cfg.agent_rate)
        self.from_agent = self._resampler(cfg.agent_rate, rate)
        self.pacer = Pacer(rate=rate, frame_samples=self.frame, clock_rate=MEDIA_RATE)
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
                return decoder.recover(frame.following, self.frame)
            self.counters["concealed"] += 1
            return decoder.conceal(self.frame)
        except OpusError:
            self.counters["decode_errors"] += 1
            return None

    def _hear(self, pcm: np.ndarray, now: float) -> None:
        events, size, step = self._events, self.frame, self._vad_step
        for start in range(0, len(pcm) - size + 1, size):
            frame = pcm[start : start + size]
            if step == 1:
                voiced, turn_events = self.endpointer.push(frame, now)
            else:  # 24 kHz: the mean of each 3 samples, 8 kHz for the VAD
                wide = frame.astype(np.int32)
                low = ((wide[0::3] + wide[1::3] + wide[2::3]) // 3).astype(np.int16)
                voiced, turn_events = self.endpointer.push(low, now)
            for event in turn_events:
                if isinstance(event, SpeechStarted) and self.playing is not None:
                    item, sent_ms = self._cut(now)
                    events.append(Interrupted(now, item, sent_ms))
                events.append(event)
            if self.started:
                self._to_agent(frame, voiced, now)

    def _to_agent(self, frame: np.ndarray, voiced: bool, now: float) -> None:
        """Audio for the agent in whole 20 ms frames (a resampler's output comes in uneven
        pieces)."""
        if self.to_agent is None:
            self._events.append(AudioIn(now, frame, voiced))
            return
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
        resampler = self.from_agent
        self.pacer.enqueue(pcm if resampler is None else resampler.process(pcm), item_id, now)

    def finish(self, item_id: str | None, now: float) -> None:
        """No more audio for `item_id`: its last partial frame is padded and played."""
        if self.playing != item_id:
            return
        if self.from_agent is not None:
            tail = self.from_agent.flush()
            if len(tail):
                self.pacer.enqueue(tail, item_id, now)
            self.from_agent = self._resampler(self.config.agent_rate, self.codec_rate)
        self.pacer.finish(item_id)
        self._collect_done(now)

    def interrupt(self, now: float) -> tuple[str | None, int]:
        """The agent's own cancel: drop what is queued; (item, ms of it sent)."""
        return self._cut(now)

    def _resampler(self, from_rate: int, to_rate: int) -> Resampler | None:
        if from_rate == to_rate:
            return None
        return Resampler(from_rate, to_rate, self.config.resample_quality)

    def _cut(self, now: float) -> tuple[str | None, int]:
        item, sent_ms = self.pacer.clear()
        item = item if item is not None else self.playing
        self.playing = None
        self.from_agent = self._resampler(self.config.agent_rate, self.codec_rate)
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
