"""The Realtime bridge with real calls (Opus over DTLS-SRTP into a real transceiver) against
real WebSocket backends: well-behaved, and each way a backend goes wrong."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest

from tests.support.voice import (
    Caller,
    ScriptedBackend,
    agent_stack,
    silence,
    speech,
    stream_reply,
    tone24,
    tone_share,
)
from voicerelay.voice import realtime
from voicerelay.voice.bridge import BridgeConfig, RealtimeBridge

PROMPT = (660.0, 440.0)  # the "agent unavailable" beeps
TURN = "what is the weather today"


def _bridge(url: str, **overrides) -> RealtimeBridge:
    return RealtimeBridge(BridgeConfig(url, **overrides))


async def _turn(caller: Caller) -> float:
    """Speak one turn and a second of silence (the endpointer ends it); returns when the
    speaking stopped."""
    await caller.say(speech(TURN))
    stopped = time.monotonic()
    await caller.say(silence(0.4))
    return stopped


async def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_turn_goes_up_committed_and_the_reply_comes_back_paced(tmp_path):
    async def answer(ws, event, backend):
        await stream_reply(ws, tone24(500, 1.0))  # a whole second delivered at once

    async with ScriptedBackend(answer) as backend:
        bridge = _bridge(backend.url)
        async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
            stopped = await _turn(caller)
            await caller.wait_heard(0.9, timeout=5, since=stopped)
            await caller.wait_quiet(0.3, timeout=5)
            types = backend.types()
            assert types[0] == "session.update"
            session = backend.received[0]["session"]
            assert session["audio"]["input"]["turn_detection"] is None
            assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            # the person's audio, then commit and response.create, in that order
            first_append = types.index("input_audio_buffer.append")
            commit = types.index("input_audio_buffer.commit")
            assert first_append < commit < types.index("response.create")
            appended = b"".join(
                base64.b64decode(e["audio"])
                for e in backend.received[:commit]
                if e["type"] == "input_audio_buffer.append"
            )
            spoken = speech(TURN).size / 48000
            # the voiced part (espeak pads its speech with silence) plus pre-roll and hangover
            assert 0.8 * spoken <= len(appended) / 2 / 24000 <= spoken + 0.3 + 0.4

            heard = caller.heard(since=stopped)
            assert tone_share(np.concatenate([p for _, p in heard]), (500.0,)) > 0.8
            arrivals = [at for at, _ in heard]
            span = arrivals[-1] - arrivals[0]
            assert span >= 0.9 * (len(arrivals) - 1) * 0.02  # paced, not a burst
            assert bridge.counters["responses"] == 1 and bridge.counters["turns"] == 1
            assert not any(k.startswith("failures") for k in bridge.counters)


async def test_barge_in_cuts_the_reply_and_truncates_it_upstream(tmp_path):
    async def long_answer(ws, event, backend):  # 6 s of reply, delivered at twice real time
        if sum(t == "response.create" for t in backend.types()) == 1:
            await stream_reply(ws, tone24(500, 6.0), pace=0.05)

    async with ScriptedBackend(long_answer) as backend:
        bridge = _bridge(backend.url)
        async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
            stopped = await _turn(caller)
            await caller.wait_heard(1.0, timeout=5, since=stopped)
            barge = time.monotonic()
            await caller.say(speech("stop"))
            await caller.wait_quiet(0.3, timeout=3)
            reply = [at for at, _ in caller.heard(since=stopped)]
            assert reply[-1] - reply[0] < 4.0  # far less than the 6 s reply
            first_speech = next(t for t in caller.sent_speech_at if t >= barge)
            assert reply[-1] - first_speech < 0.3  # the agent went quiet at once
            await _wait(
                lambda: "conversation.item.truncate" in backend.types(), 3, "the truncation"
            )
            truncate = next(
                e for e in backend.received if e["type"] == "conversation.item.truncate"
            )
            assert "response.cancel" in backend.types()  # the reply was still coming
            assert truncate["item_id"] == "item_1"
            heard_ms = len(reply) * 20
            assert abs(truncate["audio_end_ms"] - heard_ms) <= 100  # what really went out
            assert bridge.counters["interruptions"] == 1


async def _assert_prompt_and_call_survives(stack, caller, bridge, reason: str) -> None:
    await _wait(lambda: bridge.counters[f"failures_{reason}"] >= 1, 10, f"failure {reason}")
    await caller.wait_quiet(0.3, timeout=5)
    assert tone_share(caller.heard_pcm(), PROMPT) > 0.5  # the caller was told
    (call,) = stack.server.calls.values()
    assert call.session.state == "secure"  # and the call goes on


async def test_a_refused_connection_plays_the_prompt_and_keeps_the_call(tmp_path, unused_port):
    bridge = _bridge(f"ws://127.0.0.1:{unused_port}/v1/realtime")
    async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
        await _assert_prompt_and_call_survives(stack, caller, bridge, "connect-refused")
        before = len(caller.call.received)
        await _turn(caller)  # the next turn tries again, and says so again
        await _wait(lambda: bridge.counters["failures_connect-refused"] >= 2, 10, "a retry")
        await caller.wait_quiet(0.3, timeout=5)
        assert len(caller.call.received) - before >= 20


@pytest.mark.parametrize(
    ("reason", "misbehave"),
    [
        ("closed", "close"),
        ("not-json", "garbage"),
        ("oversized", "oversized"),
        ("bad-audio", "odd-audio"),
        ("response-failed", "failed"),
    ],
)
async def test_a_broken_backend_is_counted_and_the_caller_told(tmp_path, reason, misbehave):
    async def answer(ws, event, backend):
        await ws.send_str(realtime.server_response_created("resp_1"))
        await ws.send_str(realtime.server_audio_delta("resp_1", "item_1", tone24(500, 0.2)))
        if misbehave == "close":
            await ws.close()
        elif misbehave == "garbage":
            await ws.send_str("{this is not json")
        elif misbehave == "oversized":
            await ws.send_str(json.dumps({"type": "response.output_audio.delta", "x": "a" * 2**21}))
        elif misbehave == "failed":
            await ws.send_str(realtime.server_response_done("resp_1", "failed"))
        elif misbehave == "odd-audio":
            bad = json.dumps(
                {
                    "type": "response.output_audio.delta",
                    "response_id": "resp_1",
                    "item_id": "item_1",
                    "delta": base64.b64encode(b"\x01\x02\x03").decode(),
                }
            )
            await ws.send_str(bad)

    async with ScriptedBackend(answer) as backend:
        bridge = _bridge(backend.url)
        async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
            await _turn(caller)
            await _assert_prompt_and_call_survives(stack, caller, bridge, reason)


async def test_a_silent_backend_times_out_into_the_prompt(tmp_path):
    async def never(ws, event, backend):
        await asyncio.sleep(60)

    async with ScriptedBackend(never) as backend:
        bridge = _bridge(backend.url, response_timeout=1.0)
        async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
            await _turn(caller)
            await _assert_prompt_and_call_survives(stack, caller, bridge, "response-timeout")


async def test_a_backend_slower_than_real_time_is_played_without_bursts(tmp_path):
    async def slow(ws, event, backend):  # 100 ms of audio every 150 ms
        await stream_reply(ws, tone24(500, 1.0), pace=0.15)

    async with ScriptedBackend(slow) as backend:
        bridge = _bridge(backend.url)
        async with agent_stack(bridge, tmp_path) as stack, Caller.dial(stack) as caller:
            stopped = await _turn(caller)
            await caller.wait_heard(0.95, timeout=6, since=stopped)
            arrivals = [at for at, _ in caller.heard(since=stopped)]
            gaps = np.diff(arrivals)
            assert (gaps > 0.005).mean() > 0.9  # one packet at a time, never a burst
            (call,) = stack.server.calls.values()
            stats = stack.server.session_stats(call.id)
            assert stats["audio"]["pacer_underruns"] >= 1  # the gaps are counted
            assert not any(k.startswith("failures") for k in bridge.counters)
