"""`relayctl call --play IN.wav --record OUT.wav`: a WAV as the microphone, what came back on the
call's timeline, the turns. The pure pieces (WAV codec, timeline, listening plan, event-stream
parser) are property-tested; the command runs end to end against `relayctl up` in echo mode."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import wave

import aiohttp
import numpy as np
import pytest
import soxr
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.e2e.conftest import UpStack
from tests.support.procs import RELAYCTL, RelayProcess, TransceiverProcess
from voicerelay.cli.call_client import (
    SAMPLE_RATE,
    EventLog,
    EventStreamParser,
    ListenPlan,
    Timeline,
    WavError,
    collect_events,
    conversation,
    decode_wav,
    encode_wav,
    load_wav,
    to_call_audio,
)
from voicerelay.wire.token import write_new_secret

FRAME = 960

# --- WAV codec ----------------------------------------------------------------------------


def _wav_bytes(samples: np.ndarray, rate: int, channels: int, width: int = 2) -> bytes:
    """A WAV written by the standard library (an independent encoder)."""
    import io

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buffer.getvalue()


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    st.data(),
)
def test_pcm_wavs_decode_to_their_samples(channels, rate, data):
    samples = data.draw(hnp.arrays(np.int16, (data.draw(st.integers(1, 500)), channels)))
    decoded, decoded_rate = decode_wav(_wav_bytes(samples, rate, channels))
    assert decoded_rate == rate and np.array_equal(decoded, samples)


@given(hnp.arrays(np.int16, st.integers(1, 2000)))
def test_encoded_wavs_round_trip_and_the_standard_library_reads_them(samples):
    blob = encode_wav(samples)
    decoded, rate = decode_wav(blob)
    assert rate == SAMPLE_RATE and np.array_equal(decoded[:, 0], samples)
    import io

    with wave.open(io.BytesIO(blob)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), samples)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_wav_error_or_samples(blob):
    for data in (blob, b"RIFF\x00\x00\x00\x00WAVE" + blob):
        try:
            samples, rate = decode_wav(data)
        except WavError as exc:
            assert "\n" not in str(exc) and str(exc)
        else:
            assert samples.dtype == np.int16 and samples.shape[1] in (1, 2) and rate >= 1000


def test_what_is_wrong_with_a_wav_is_said_in_one_line():
    tone = np.zeros(100, np.int16)
    cases = {
        b"hello world, not audio": "not a WAV file",
        _wav_bytes(np.zeros(300, np.uint8), 8000, 1, width=1): "sample width (8-bit)",
        _wav_bytes(np.zeros(300, np.int16), 8000, 3): "channel count (3)",
        _wav_bytes(np.zeros(0, np.int16), 8000, 1): "holds no audio",
        _wav_bytes(tone, 8000, 1).replace(b"data", b"junk"): "no data chunk",
        _wav_bytes(tone, 8000, 1).replace(b"fmt ", b"junk"): "no fmt chunk",
        # a float WAV: format tag 3
        _wav_bytes(tone, 8000, 1).replace(b"\x01\x00\x01\x00", b"\x03\x00\x01\x00", 1): "float",
    }
    for blob, says in cases.items():
        with pytest.raises(WavError, match=r"[^\n]*" + __import__("re").escape(says)):
            decode_wav(blob)


def test_a_truncated_data_chunk_keeps_what_is_there():
    blob = _wav_bytes(np.arange(1000, dtype=np.int16), 16000, 1)
    samples, _ = decode_wav(blob[:-101])  # an odd cut: half a sample is dropped
    assert np.array_equal(samples[:, 0], np.arange(949, dtype=np.int16))


def test_any_wav_becomes_48_khz_mono_at_the_same_pitch_and_length():
    rate = 22050
    t = np.arange(rate) / rate
    left = (8000 * np.sin(2 * np.pi * 500 * t)).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    out = to_call_audio(stereo, rate)
    assert out.dtype == np.int16 and abs(out.size - SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(out.astype(float)))
    assert abs(np.fft.rfftfreq(out.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)] - 500) < 2
    assert abs(np.abs(out[1000:-1000]).max() - 8000) < 200  # averaging kept the level


def test_load_wav_says_why_it_cannot_read(tmp_path):
    with pytest.raises(WavError, match="cannot read it"):
        load_wav(tmp_path / "absent.wav")


# --- the timeline of what came back -------------------------------------------------------


def _frame(level: float) -> np.ndarray:
    return np.full(FRAME, level, np.int16)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.06), st.sampled_from([0, 3, 3000])), max_size=60))
def test_frames_never_overlap_never_come_early_and_sound_is_never_lost(arrivals):
    """Arrival gaps of 0-60 ms (bursts and holes), silent or loud frames."""
    timeline, at, placed_loud = Timeline(), 0.0, 0
    for gap, level in arrivals:
        at += gap
        before = round(timeline.duration_s * SAMPLE_RATE)
        timeline.place(_frame(level), at)
        end = round(timeline.duration_s * SAMPLE_RATE)
        if level == 3000:  # sound: whole, after what was there, not (much) before it arrived
            placed_loud += FRAME
            assert end - FRAME >= max(before, round(at * SAMPLE_RATE) - FRAME // 2)
    samples = timeline.samples()
    assert int(np.count_nonzero(samples == 3000)) == placed_loud == timeline.audible_samples
    assert samples.size == round(timeline.duration_s * SAMPLE_RATE)


def test_steady_frames_land_where_they_arrived():
    timeline = Timeline()
    for i in range(10):
        timeline.place(_frame(1000 + i), 0.5 + i * 0.02)
    samples = timeline.samples(until_s=1.0)
    assert samples.size == SAMPLE_RATE and not samples[:24000].any()
    assert [samples[24000 + i * FRAME] for i in range(10)] == [1000 + i for i in range(10)]
    assert timeline.first_audible_s == 0.5 and timeline.last_audible_s == 0.7


def test_jitter_under_half_a_frame_leaves_no_gap_and_a_lost_frame_does():
    timeline, rng = Timeline(), np.random.default_rng(1)
    for i in range(50):
        if i != 30:  # frame 30 was lost
            timeline.place(_frame(1000), 0.1 + i * 0.02 + rng.uniform(0, 0.009))
    samples = timeline.samples()
    start = int(np.flatnonzero(samples)[0])
    assert start - round(0.1 * SAMPLE_RATE) < FRAME // 2
    silent = np.flatnonzero(samples[start:] == 0)
    assert 0 < silent.size <= 2 * FRAME and np.all(np.diff(silent) == 1)  # one gap: the loss
    assert abs(start + silent[0] - round(0.7 * SAMPLE_RATE)) <= FRAME // 2


def test_after_a_stall_silence_lets_the_timeline_catch_up():
    timeline = Timeline()
    timeline.place(_frame(1000), 0.0)
    for _ in range(5):  # a 100 ms stall: five frames at once
        timeline.place(_frame(1000), 0.12)
    assert timeline.duration_s == pytest.approx(0.22)
    for i in range(1, 6):  # silent frames on time: trimmed while the timeline is behind
        timeline.place(_frame(0), 0.12 + i * 0.02)
    timeline.place(_frame(2000), 0.24)
    assert timeline.trimmed == 4 * FRAME  # the stall's worth of silence
    assert timeline.samples()[round(0.24 * SAMPLE_RATE)] == 2000  # back on time


# --- how long to listen -------------------------------------------------------------------


def test_the_call_waits_for_the_recording_then_for_a_reply_and_quiet():
    plan = ListenPlan(played_end_s=3.0, speech_end_s=2.6, quiet_s=1.5, listen_s=15, timeout_s=5)
    assert plan.verdict(2.9, 2.8) == "listen"  # still playing
    assert plan.verdict(4.0, 2.0) == "listen"  # heard sound, but none after the last words
    assert plan.verdict(4.1, 2.7) == "listen"  # the reply (or echo) of the last words...
    assert plan.verdict(4.2, 2.7) == "done"  # ...then 1.5 s quiet
    assert plan.verdict(7.9, None) == "listen"
    assert plan.verdict(8.0, None) == "silent"  # nothing at all within the timeout
    assert plan.verdict(18.0, 2.0) == "done"  # no reply to the last words: at most listen_s


@given(
    st.floats(0, 100),
    st.floats(0, 100),
    st.floats(0.1, 5),
    st.floats(0.2, 60),
    st.floats(0.1, 60),
    st.floats(0, 200),
    st.none() | st.floats(0, 200),
)
def test_listening_never_ends_early_and_always_ends(
    played, speech, quiet, listen, timeout, now, last
):
    plan = ListenPlan(played, speech, quiet, listen, timeout)
    verdict = plan.verdict(now, last)
    if now < played:
        assert verdict == "listen"
    if now >= played + listen:
        assert verdict != "listen"
    if verdict == "silent":
        assert last is None


# --- conversation events ------------------------------------------------------------------

STREAM = (
    b": a comment\n\n"
    b'data: {"type": "call.started", "at_ms": 5}\n\n'
    b'data: {"type": "user.transcript", "item_id": "u1", "text": "hello world", "at_ms": 900}\r\n'
    b"\r\n"
    b'data: {"type": "agent.transcript", "item_id": "a1", "text": "You said", "final": false}\n\n'
    b'data: {"type": "agent.transcript", "item_id": "a1",\n'
    b'data:  "text": "You said: hello world", "final": true}\n\n'
    b"event: ignored\ndata: not json\n\n"
    b'data: {"type": "agent.interrupted", "item_id": "a1", "sent_ms": 1200, "at_ms": 3000}\n\n'
    b'data: [1, 2]\n\ndata: {"type": "call.ended", "reason": "deleted"}\n\n'
)


def test_the_event_stream_gives_transcripts_and_interruptions():
    parser = EventStreamParser()
    events = parser.feed(STREAM)
    assert [e["type"] for e in events] == [
        "call.started",
        "user.transcript",
        "agent.transcript",
        "agent.transcript",
        "agent.interrupted",
        "call.ended",
    ]
    assert parser.bad == 2  # "not json" and a JSON array
    transcripts, interruptions = conversation(events)
    assert [(t["who"], t["text"]) for t in transcripts] == [
        ("you", "hello world"),
        ("agent", "You said: hello world"),
    ]
    assert interruptions == [{"item_id": "a1", "sent_ms": 1200, "at_ms": 3000}]


@given(st.lists(st.integers(0, len(STREAM)), max_size=8))
def test_the_event_stream_parses_the_same_however_it_is_split(cuts):
    whole = EventStreamParser().feed(STREAM)
    parser, events, edges = EventStreamParser(), [], [0, *sorted(cuts), len(STREAM)]
    for a, b in zip(edges, edges[1:], strict=False):
        events += parser.feed(STREAM[a:b])
    assert events == whole and parser.bad == 2


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=80), max_size=10))
def test_arbitrary_bytes_never_raise_the_parser(chunks):
    parser = EventStreamParser(max_line=64)
    for chunk in chunks:
        for event in parser.feed(chunk):
            assert isinstance(event, dict)
    assert conversation([{}, {"type": 3, "text": None}, {"type": "agent.transcript"}]) == ([], [])


def test_collect_events_reads_a_real_stream_and_notes_a_missing_one():
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(STREAM), 37):  # in pieces, as a server flushes them
            await resp.write(STREAM[i : i + 37])
        return resp

    async def scenario() -> tuple[EventLog, EventLog, EventLog]:
        app = web.Application()
        app.router.add_get("/v1/sessions/x/events", stream)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        logs = EventLog(), EventLog(), EventLog()
        url = str(server.make_url("/v1/sessions/x/events"))
        try:
            async with aiohttp.ClientSession() as http:
                await collect_events(http, url, logs[0])
                await collect_events(http, url.replace("/x/", "/y/"), logs[1])
                await server.close()
                await collect_events(http, url, logs[2])
        finally:
            await server.close()
        return logs

    found, missing, down = asyncio.run(scenario())
    assert found.status == "ended" and len(found.events) == 6 and found.bad == 2
    assert missing.status == "not offered (404)" and missing.events == []
    assert down.status.startswith("unavailable (") and down.events == []


# --- end to end: relayctl call --play against relayctl up (echo) --------------------------


@pytest.fixture(scope="module")
def echo_stack(tmp_path_factory):
    """`relayctl up` as tests/e2e/conftest.py runs it: echo unless told otherwise."""
    stack = UpStack(tmp_path_factory.mktemp("up") / "state").start()
    yield stack
    stack.cleanup()


@pytest.fixture
def no_relay(tmp_path):
    """Signaling answers, but nothing runs behind the relay address in its answers."""
    relay = RelayProcess(tmp_path / "state")
    write_new_secret(relay.secret_file)
    with TransceiverProcess(relay) as transceiver:
        yield transceiver


def _speech_wav(path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install)")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), "hello world"],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _lag_and_match(played: np.ndarray, recorded: np.ndarray) -> tuple[float, float]:
    """Where `recorded` best matches `played` (seconds later, 0-1 s) and how well (0-1)."""
    n = 1 << int(np.ceil(np.log2(played.size + recorded.size)))
    a, b = played.astype(float), recorded.astype(float)
    corr = np.fft.irfft(np.conj(np.fft.rfft(a, n)) * np.fft.rfft(b, n), n)[:SAMPLE_RATE]
    lag = int(np.argmax(corr))
    window = b[lag : lag + a.size]
    match = corr[lag] / (np.linalg.norm(a[: window.size]) * np.linalg.norm(window) + 1e-9)
    return lag / SAMPLE_RATE, float(match)


def test_a_played_recording_echoes_back_in_line_with_what_was_played(echo_stack, tmp_path):
    speech, out = tmp_path / "hello.wav", tmp_path / "back.wav"
    _speech_wav(speech)
    result = subprocess.run(
        [*RELAYCTL, "call", echo_stack.url, "--play", str(speech), "--record", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["audio_came_back"] and report["error"] is None, report["error"]

    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        recorded = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    with wave.open(str(speech)) as w:  # what we played, converted independently
        source = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32)
        assert w.getframerate() == 22050
    played = np.concatenate(
        [np.zeros(round(report["lead_in_s"] * SAMPLE_RATE)), soxr.resample(source, 22050, 48000)]
    )
    lag, match = _lag_and_match(played, recorded)
    assert 0 <= lag < 0.2 and match > 0.7, (lag, match)  # the echo, on the call's timeline

    [turn] = report["turns"]
    assert turn["overlap"] and turn["reply_from_s"] < turn["spoke_to_s"]  # echo answers at once
    assert 0 <= turn["reply_from_s"] - turn["spoke_from_s"] < 0.2
    assert report["received_s"] >= report["played_s"]  # the whole call is on the recording
    assert report["events_status"] != "not requested"


def test_the_human_report_names_the_turns_and_the_recording(echo_stack, tmp_path):
    speech, out = tmp_path / "hello.wav", tmp_path / "back.wav"
    _speech_wav(speech)
    result = subprocess.run(
        [*RELAYCTL, "call", echo_stack.url, "--play", str(speech), "--record", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("audio came back: 1 turn, the reply overlapped your speech")
    assert lines[1].startswith("  turn 1: you 0.5") and "began while you spoke" in lines[1]
    assert lines[-1].startswith(f"  recording: {out} (")


def test_silence_that_stays_silent_fails_but_the_recording_is_written(echo_stack, tmp_path):
    """Media flows (the echo of silence comes back) but no sound: exit 1, and the call's
    timeline is still written."""
    quiet, out = tmp_path / "quiet.wav", tmp_path / "back.wav"
    quiet.write_bytes(encode_wav(np.zeros(SAMPLE_RATE // 2, np.int16)))
    args = ["--play", str(quiet), "--record", str(out), "--timeout", "1", "--json"]
    result = subprocess.run(
        [*RELAYCTL, "call", echo_stack.url, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["connected"] and not report["audio_came_back"]
    assert report["step"] == "media"
    assert report["error"].startswith(
        "media: no audio came back within 1 s after the recording ended: the call is up"
    )
    assert report["frames_received"] > 25  # the silence did come back
    samples, rate = decode_wav(out.read_bytes())
    assert rate == SAMPLE_RATE and samples.shape[0] >= (report["played_s"] + 1) * SAMPLE_RATE
    assert report["turns"] == [] and report["recording"] == str(out)


def test_a_call_that_never_connects_is_one_line_and_writes_nothing(no_relay, tmp_path):
    speech, out = tmp_path / "hello.wav", tmp_path / "back.wav"
    _speech_wav(speech)
    args = ["--play", str(speech), "--record", str(out), "--timeout", "1.5"]
    result = subprocess.run(
        [*RELAYCTL, "call", no_relay.url, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout.startswith("call failed: ICE did not connect within 1.5 s (ICE ")
    assert len(result.stdout.splitlines()) == 1 and not out.exists()
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("make", "says", "codes"),
    [
        (lambda p: p.write_text("not audio at all"), "not a WAV file", (2,)),
        (lambda p: None, "does not exist", (2,)),
        (
            lambda p: p.write_bytes(
                b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00"
                b"\x40\x1f\x00\x00\x40\x1f\x00\x00\x01\x00\x08\x00data\x00\x00\x00\x00"
            ),
            "unsupported sample width (8-bit)",
            (2,),
        ),
    ],
)
def test_a_bad_play_file_is_one_line(tmp_path, make, says, codes):
    bad = tmp_path / "in.wav"
    make(bad)
    result = subprocess.run(
        [*RELAYCTL, "call", "http://127.0.0.1:9", "--play", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode in codes
    assert "Traceback" not in result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "--play" in lines[0], lines


def test_record_needs_play(tmp_path):
    result = subprocess.run(
        [*RELAYCTL, "call", "--record", str(tmp_path / "x.wav")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "add --play" in result.stderr
