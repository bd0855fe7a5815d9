"""CallAudio, sans-IO: real Opus packets of real speech in, on a fake clock."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.voice import silence, speech
from voicerelay.transceiver.rtp import RtpPacket, parse_rtp
from voicerelay.voice.events import (
    AudioIn,
    CallEnded,
    CallStarted,
    Interrupted,
    PlaybackDone,
    SpeechStarted,
    TurnEnded,
)
from voicerelay.voice.opus import OpusDecoder, OpusEncoder
from voicerelay.voice.pipeline import AudioConfig, CallAudio

PT = 111


def _packets(pcm: np.ndarray, first_seq: int = 1000) -> list[bytes]:
    encoder = OpusEncoder(48000)
    frames = pcm.size // 960
    return [
        RtpPacket(
            PT, (first_seq + i) & 0xFFFF, i * 960, 77, encoder.encode(pcm[i * 960 : (i + 1) * 960])
        ).serialize()
        for i in range(frames)
    ]


class Clock:
    """Feeds packets every 20 ms and runs the app's timer whenever it is due."""

    def __init__(self, audio: CallAudio) -> None:
        self.audio = audio
        self.now = 0.0
        self.sent: list[tuple[float, bytes]] = []

    def advance(self, until: float) -> None:
        while True:
            timer = self.audio.next_timer()
            if timer is None or timer > until:
                break
            self.now = max(self.now, timer)
            self.sent += [(self.now, p) for p in self.audio.handle_timer(self.now)]
        self.now = until

    def feed(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.advance(self.now + 0.02)
            self.audio.on_rtp(packet, self.now)


def _audio(agent_rate: int = 16000, **config) -> CallAudio:
    audio = CallAudio(
        ssrc=4242, payload_type=PT, config=AudioConfig(agent_rate=agent_rate, **config)
    )
    audio.start(0.0)
    return audio


def test_a_spoken_turn_gives_frames_speech_started_and_turn_ended():
    audio = _audio()
    clock = Clock(audio)
    said = speech("what is the weather today")
    clock.feed(_packets(np.concatenate([silence(0.5), said, silence(0.6)])))
    events = audio.events()
    assert isinstance(events[0], CallStarted) and events[0].sample_rate == 16000
    frames = [e for e in events if isinstance(e, AudioIn)]
    assert all(f.pcm.size == 320 for f in frames)  # 20 ms at the agent's 16 kHz
    fed = (said.size + int(1.1 * 48000)) // 960
    assert fed - 2 <= len(frames) <= fed  # the resampler may still hold up to two frames
    (started,) = [e for e in events if isinstance(e, SpeechStarted)]
    (ended,) = [e for e in events if isinstance(e, TurnEnded)]
    loud = np.flatnonzero(np.abs(said) > 0.05 * np.abs(said).max())
    spoken_end = 0.5 + loud[-1] / 48000  # espeak pads its speech with silence
    assert 0.5 <= started.at <= 0.7
    assert abs(ended.speech_ended_at - spoken_end) <= 0.15
    assert ended.at - ended.speech_ended_at <= 0.25  # the endpointing budget
    assert audio.stats["concealed"] == 0


def test_lost_packets_are_concealed_or_recovered_and_time_keeps_flowing():
    audio = _audio()
    clock = Clock(audio)
    packets = _packets(np.concatenate([speech("hello there"), silence(0.4)]))
    kept = [p for i, p in enumerate(packets) if i % 10 != 5]  # 10 % loss
    clock.feed(kept)
    clock.advance(clock.now + 0.2)
    frames = [e for e in audio.events() if isinstance(e, AudioIn)]
    assert len(frames) == len(packets)  # every frame: at 16 kHz Opus decodes without a resampler
    lost = len(packets) - len(kept)
    assert audio.stats["concealed"] + audio.stats["recovered"] == lost - 0
    assert audio.stats["recovered"] > 0  # in-band FEC rebuilt some


def test_agent_audio_is_paced_one_frame_per_20ms_with_a_marker_then_done():
    audio = _audio()
    clock = Clock(audio)
    agent_pcm = (np.sin(np.arange(16000) * 2 * np.pi * 500 / 16000) * 8000).astype(np.int16)
    audio.play(agent_pcm, "item_1", 0.0)  # one second, delivered at once
    audio.finish("item_1", 0.0)
    clock.advance(2.0)
    packets = [(at, parse_rtp(p)) for at, p in clock.sent]
    assert len(packets) == 50
    times = [at for at, _ in packets]
    assert np.allclose(np.diff(times), 0.02)
    stamps = [p.timestamp for _, p in packets]
    assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:], strict=False))
    assert packets[0][1].marker and not any(p.marker for _, p in packets[1:])
    assert {p.payload_type for _, p in packets} == {PT}
    decoded = np.concatenate([OpusDecoder().decode(p.payload) for _, p in packets])
    assert np.abs(decoded).max() > 4000  # real audio went out
    done = [e for e in audio.events() if isinstance(e, PlaybackDone)]
    assert [(d.item_id, d.sent_ms) for d in done] == [("item_1", 1000)]


def test_barge_in_drops_the_queue_and_says_how_much_went_out():
    audio = _audio()
    clock = Clock(audio)
    audio.play(np.full(16000 * 5, 3000, dtype=np.int16), "item_1", 0.0)  # 5 s queued
    clock.feed(_packets(silence(0.5)))  # the agent talks, the person is silent
    sent_before = len(clock.sent)
    clock.feed(_packets(speech("stop it now")))
    events = audio.events()
    (cut,) = [e for e in events if isinstance(e, Interrupted)]
    started = next(e for e in events if isinstance(e, SpeechStarted))
    assert cut.item_id == "item_1"
    assert 0 <= cut.at - started.at <= 0.08  # decided once start_ms (60) of speech was heard
    frames_out = [at for at, _ in clock.sent if at <= cut.at]
    assert cut.sent_ms == len(frames_out) * 20
    assert sent_before * 20 <= cut.sent_ms < 5000
    assert all(at <= cut.at for at, _ in clock.sent)  # nothing after the cut
    assert audio.next_timer() is None or audio.pacer.next_due() is None


def test_call_end_is_an_event_and_play_after_it_is_ignored():
    audio = _audio()
    audio.end(1.0, "deleted")
    audio.play(np.ones(320, dtype=np.int16), "x", 1.0)
    events = audio.events()
    assert isinstance(events[-1], CallEnded) and events[-1].reason == "deleted"
    assert audio.next_timer() is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=80), max_size=40))
def test_arbitrary_rtp_never_raises(payloads):
    audio = _audio()
    for i, data in enumerate(payloads):
        audio.on_rtp(data, i * 0.02)
        audio.handle_timer(i * 0.02)
    audio.events()


def test_an_agent_rate_opus_lacks_goes_through_resamplers_both_ways():
    audio = _audio(agent_rate=22050)
    assert audio.codec_rate == 48000 and audio.to_agent is not None
    clock = Clock(audio)
    said = speech("hello there")
    clock.feed(_packets(np.concatenate([said, silence(0.6)])))
    frames = [e for e in audio.events() if isinstance(e, AudioIn)]
    assert frames and all(f.pcm.size == 441 for f in frames)  # 20 ms at 22.05 kHz
    tone = (np.sin(np.arange(22050) * 2 * np.pi * 500 / 22050) * 8000).astype(np.int16)
    audio.play(tone, "item", clock.now)
    audio.finish("item", clock.now)
    clock.advance(clock.now + 1.5)
    decoded = np.concatenate([OpusDecoder().decode(parse_rtp(p).payload) for _, p in clock.sent])
    assert 0.95 <= decoded.size / 48000 <= 1.05  # a second of audio went out, resampled to 48 k


def test_the_default_agent_rate_needs_no_resampler_and_stamps_on_the_48k_clock():
    audio = _audio(agent_rate=24000)
    assert audio.codec_rate == 24000 and audio.to_agent is None and audio.from_agent is None
    clock = Clock(audio)
    audio.play(np.full(24000, 2000, dtype=np.int16), "item", 0.0)
    audio.finish("item", 0.0)
    clock.advance(1.5)
    stamps = [parse_rtp(p).timestamp for _, p in clock.sent]
    assert len(stamps) == 50
    assert all((b - a) % 2**32 == 960 for a, b in zip(stamps, stamps[1:], strict=False))
