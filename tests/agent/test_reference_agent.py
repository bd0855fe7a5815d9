"""The reference agent: its sans-IO conversation core (properties) and the real server (real
WebSocket client, real Whisper, real espeak-ng), plus the `python -m voicerelay.agent` process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent.conftest import running_agent, transcribe24k
from voicerelay.agent.server import AgentConversation, AgentStats, Hear, reply_text
from voicerelay.voice import realtime as rt

CHUNK = 2400  # 100 ms at 24 kHz


# A WebSocket client speaking the subset --------------------------------------------------------
class Client:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def recv(self, timeout: float = 20.0) -> rt.ServerEvent:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return rt.parse_server_event(msg.data)

    async def until(
        self, kind: type, match: Callable[[Any], bool] = lambda e: True, timeout: float = 20.0
    ) -> list[rt.ServerEvent]:
        """Every event up to and including the first `kind` that `match`es."""
        deadline = time.monotonic() + timeout
        seen: list[rt.ServerEvent] = []
        while True:
            event = await self.recv(max(0.01, deadline - time.monotonic()))
            seen.append(event)
            if isinstance(event, kind) and match(event):
                return seen

    async def say(self, pcm: np.ndarray) -> str:
        """Append the audio in 100 ms events and commit; the committed item id."""
        for start in range(0, pcm.size, CHUNK):
            await self.send(rt.input_audio_append(pcm[start : start + CHUNK].tobytes()))
        await self.send(rt.input_audio_commit())
        (*_, committed) = await self.until(rt.InputCommitted)
        return committed.item_id


async def connect(
    session: aiohttp.ClientSession, url: str, key: str | None = None
) -> tuple[Client, aiohttp.ClientWebSocketResponse]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    ws = await session.ws_connect(url, headers=headers)
    client = Client(ws)
    assert isinstance(await client.recv(), rt.SessionCreated)
    await client.send(rt.session_update())
    assert isinstance(await client.recv(), rt.SessionUpdated)
    return client, ws


def of(kind: type, events: list[rt.ServerEvent]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def stats_of(session: aiohttp.ClientSession, url: str, key: str | None = None) -> dict:
    http = url.replace("ws://", "http://").replace("/v1/realtime", "/v1/stats")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(http, headers=headers) as response:
        assert response.status == 200
        return await response.json()


# The real server -------------------------------------------------------------------------------
def test_a_turn_is_heard_and_answered_in_speech(transcriber, speaker, first_turn) -> None:
    async def scenario() -> tuple[list[rt.ServerEvent], dict]:
        async with running_agent(transcriber, speaker) as url, aiohttp.ClientSession() as s:
            client, ws = await connect(s, url)
            item_id = await client.say(first_turn)
            await client.send(rt.response_create())
            events = await client.until(rt.ResponseDone)
            await ws.close()
            stats = await stats_of(s, url)
            return [rt.InputCommitted(item_id), *events], stats

    events, stats = asyncio.run(scenario())
    kinds = [type(e) for e in events]
    first_delta = kinds.index(rt.AudioDelta)
    assert kinds[:first_delta] == [
        rt.InputCommitted,
        rt.InputTranscript,
        rt.ResponseCreated,
        rt.OutputItemAdded,
        rt.TranscriptDelta,
        rt.TranscriptDone,
    ]
    assert kinds[-2:] == [rt.AudioDone, rt.ResponseDone]
    assert set(kinds[first_delta:-2]) == {rt.AudioDelta}
    heard = of(rt.InputTranscript, events)[0]
    assert heard.item_id == events[0].item_id and "weather" in heard.transcript.lower()
    said = of(rt.TranscriptDone, events)[0].transcript
    assert said.startswith("You said: ") and "weather" in said.lower()
    assert events[-1].status == "completed"
    deltas = of(rt.AudioDelta, events)
    assert (
        all(len(d.pcm) == CHUNK * 2 for d in deltas[:-1]) and 0 < len(deltas[-1].pcm) <= CHUNK * 2
    )
    reply = transcribe24k(transcriber, b"".join(d.pcm for d in deltas))
    assert "weather" in reply and "today" in reply, reply
    assert stats["responses"] == 1 and stats["committed"] == 1 and stats["connections"] == 1
    assert stats["asr_calls"] == 1 and stats["asr_seconds"] > 0


def test_cancel_stops_the_reply_truncate_is_counted_and_the_turn_is_folded_in(
    transcriber, speaker, first_turn, second_turn
) -> None:
    async def scenario() -> dict[str, Any]:
        # pace 1: the reply streams in real time, so the cancel lands mid-stream
        async with (
            running_agent(transcriber, speaker, pace=1.0) as url,
            aiohttp.ClientSession() as s,
        ):
            client, ws = await connect(s, url)
            first_item = await client.say(first_turn)
            await client.send(rt.response_create())
            before = await client.until(rt.AudioDelta)
            created = of(rt.ResponseCreated, before)[0]
            reply_item = of(rt.OutputItemAdded, before)[0].item_id
            await client.send(rt.response_cancel(created.response_id))
            after_cancel = await client.until(rt.ResponseDone)
            # nothing more of that reply: the next event is the answer to a later request
            await client.send(rt.input_audio_clear())
            barrier = await client.recv()
            await client.send(rt.item_truncate(reply_item, 150))
            truncated = await client.until(rt.ItemTruncated)
            second_item = await client.say(second_turn)
            await client.send(rt.response_create())
            folded = await client.until(rt.TranscriptDone)
            await client.send(rt.response_cancel())
            rest = await client.until(rt.ResponseDone)
            await ws.close()
            return {
                "items": (first_item, second_item),
                "response_id": created.response_id,
                "after_cancel": after_cancel,
                "barrier": barrier,
                "truncated": truncated,
                "folded": folded,
                "rest": rest,
                "stats": await stats_of(s, url),
            }

    r = asyncio.run(scenario())
    done = r["after_cancel"][-1]
    assert done == rt.ResponseDone(r["response_id"], "cancelled")
    assert not of(rt.AudioDone, r["after_cancel"])
    # at most the deltas already in flight when the cancel was sent
    assert len(of(rt.AudioDelta, r["after_cancel"])) <= 2
    assert r["barrier"] == rt.Ignored("input_audio_buffer.cleared")
    assert r["truncated"][-1].audio_end_ms == 150
    # the second answer covers both turns: the first was never answered to completion
    transcripts = of(rt.InputTranscript, r["folded"])
    assert [t.item_id for t in transcripts] == [r["items"][1]]  # the first was heard already
    said = of(rt.TranscriptDone, r["folded"])[0].transcript.lower()
    assert "weather" in said and "tomorrow" in said, said
    assert r["rest"][-1].status == "cancelled"
    stats = r["stats"]
    assert stats["cancelled"] == 2 and stats["responses"] == 0
    assert stats["truncations"] == 1 and stats["truncated_audio_end_ms"] == [150]


def test_bad_events_get_error_events_and_the_connection_stays_usable(transcriber, speaker) -> None:
    async def scenario() -> tuple[list[rt.ServerEvent], dict]:
        async with running_agent(transcriber, speaker) as url, aiohttp.ClientSession() as s:
            client, ws = await connect(s, url)
            got = []
            for bad in (
                "{nope",
                "[1, 2]",
                '{"type": 7}',
                '{"type": "input_audio_buffer.append", "audio": "abc"}',
                '{"type": "conversation.item.truncate", "item_id": "x"}',
            ):
                await client.send(bad)
                got.append(await client.recv())
            await ws.send_bytes(b"\xff\xfe")
            got.append(await client.recv())
            await client.send(rt.input_audio_commit())  # nothing buffered
            got.append(await client.recv())
            await client.send(rt.response_cancel())  # nothing to cancel
            got.append(await client.recv())
            await client.send(rt.item_truncate("item_unknown", 10))
            got.append(await client.recv())
            await client.send(rt.session_update(rate=16000))
            got.append(await client.recv())
            await client.send(rt.session_update())
            got.append(await client.recv())
            await ws.close()
            return got, await stats_of(s, url)

    got, stats = asyncio.run(scenario())
    codes = [e.code for e in got[:-1]]
    assert all(isinstance(e, rt.ServerError) and e.message for e in got[:-1])
    assert codes == [
        "not-json",
        "not-object",
        "no-type",
        "bad-audio",
        "bad-field",
        "not-json",
        "commit-empty",
        "no-active-response",
        "unknown-item",
        "unsupported-rate",
    ]
    assert got[-1] == rt.SessionUpdated()
    assert stats["errors"] == {
        "not-json": 2,
        "not-object": 1,
        "no-type": 1,
        "bad-audio": 1,
        "bad-field": 1,
        "commit-empty": 1,
        "no-active-response": 1,
        "unknown-item": 1,
        "unsupported-rate": 1,
    }


def test_a_key_is_required_when_set(transcriber, speaker) -> None:
    async def scenario() -> list[Any]:
        outcomes: list[Any] = []
        async with (
            running_agent(transcriber, speaker, key="s3cret") as url,
            aiohttp.ClientSession() as s,
        ):
            for key in (None, "wrong", "s3cret2"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                try:
                    ws = await s.ws_connect(url, headers=headers)
                except aiohttp.WSServerHandshakeError as exc:
                    outcomes.append(exc.status)
                else:
                    outcomes.append(ws)
                    await ws.close()
            client, ws = await connect(s, url, key="s3cret")
            outcomes.append(type(client))
            await ws.close()
            http = url.replace("ws://", "http://").replace("/v1/realtime", "/v1/stats")
            async with s.get(http) as response:
                outcomes.append(response.status)
            outcomes.append(await stats_of(s, url, key="s3cret"))
        return outcomes

    no_key, wrong_key, wrong_suffix, ok, stats_no_key, stats = asyncio.run(scenario())
    assert (no_key, wrong_key, wrong_suffix) == (401, 401, 401)
    assert ok is Client and stats_no_key == 401
    assert stats["connections"] == 1 and stats["errors"] == {"unauthorized": 3}


def test_module_entry_point_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicerelay.agent", "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VOICERELAY_AGENT_KEY": ""},
    )
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("reference agent ready: "):
                break
        assert lines and lines[-1].startswith("reference agent ready: ws://127.0.0.1:"), lines
        url = lines[-1].split(": ", 1)[1].strip()

        async def health() -> tuple[int, dict]:
            async with aiohttp.ClientSession() as s:
                http = url.replace("ws://", "http://").replace("/v1/realtime", "/healthz")
                async with s.get(http) as response:
                    return response.status, await response.json()

        assert asyncio.run(health()) == (200, {"status": "ok"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_wrong_options_are_one_line_errors() -> None:
    for args, env, expected in (
        (["--listen", "localhost:1"], {}, "--listen host 'localhost' is not an IP address"),
        (
            [],
            {"VOICERELAY_AGENT_PACE": "0"},
            "--pace 0.0 is out of range: use 0.1-100 (times real time) "
            "(value from VOICERELAY_AGENT_PACE)",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "voicerelay.agent", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=30,
        )
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


# The sans-IO core ------------------------------------------------------------------------------
def test_reply_text() -> None:
    assert reply_text(["Hello there.", " what now? "]) == "You said: Hello there. what now."
    assert reply_text(["", "  "]) == "Sorry, I did not catch that."


class Shell:
    """Drives an AgentConversation as the asyncio shell would, with canned ASR and TTS."""

    def __init__(self, max_buffer_seconds: float = 0.5) -> None:
        self.stats = AgentStats()
        self.conv = AgentConversation(self.stats, max_buffer_seconds=max_buffer_seconds)
        self.sent: list[rt.ServerEvent] = []
        self.job: Hear | None = None
        self.speaking: str | None = None
        self.streaming: str | None = None

    def flush(self) -> None:
        self.sent += [rt.parse_server_event(text) for text in self.conv.drain()]

    def client(self, text: str) -> None:
        job = self.conv.receive(text)
        if job is not None:
            self.job = job
        self.flush()

    def asr_done(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            text = self.conv.heard(job.response_id, {i: f"words {i}" for i, _ in job.items})
            self.speaking = job.response_id if text is not None else None
        self.flush()

    def tts_done(self) -> None:
        if self.speaking is not None:
            rid, self.speaking = self.speaking, None
            self.streaming = rid if self.conv.spoken(rid, bytes(7300)) else None
        self.flush()

    def chunk(self) -> None:
        if self.streaming is not None and not self.conv.next_chunk(self.streaming):
            self.streaming = None
        self.flush()


KINDS = st.sampled_from(
    ["append", "append", "commit", "clear", "create", "cancel", "cancel-id", "truncate"]
    + ["update", "junk"]
)
SAMPLES = st.sampled_from([0, 1, 240, 2400, 7000, 12_000, 12_001])
PICK = st.integers(0, 1000)
JUNK = st.text(max_size=20)


def draw_client_text(data: st.DataObject, shell: Shell) -> str:
    """One client event's text (sometimes junk), naming ids the conversation made or not."""
    kind = data.draw(KINDS)
    if kind == "append":
        return rt.input_audio_append(bytes(2 * data.draw(SAMPLES)))
    if kind == "cancel-id":
        ids = ["resp_x", *_response_ids(shell)]
        return rt.response_cancel(ids[data.draw(PICK) % len(ids)])
    if kind == "truncate":
        ids = ["item_x", *(e.item_id for e in shell.sent if isinstance(e, rt.OutputItemAdded))]
        return rt.item_truncate(ids[data.draw(PICK) % len(ids)], data.draw(SAMPLES))
    if kind == "update":
        return rt.session_update(rate=data.draw(st.sampled_from([24000, 16000])))
    if kind == "junk":
        return data.draw(JUNK)
    simple = {
        "commit": rt.input_audio_commit,
        "clear": rt.input_audio_clear,
        "create": rt.response_create,
        "cancel": rt.response_cancel,
    }
    return simple[kind]()


def _response_ids(shell: Shell) -> list[str]:
    return [e.response_id for e in shell.sent if isinstance(e, rt.ResponseCreated)]


STEPS = st.sampled_from(["client", "client", "asr", "tts", "chunk", "chunk"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_conversation_keeps_its_promises(data: st.DataObject) -> None:
    shell = Shell()
    shell.flush()
    for _ in range(data.draw(st.integers(1, 60))):
        step = data.draw(STEPS)
        if step == "client":
            shell.client(draw_client_text(data, shell))
        else:
            {"asr": shell.asr_done, "tts": shell.tts_done, "chunk": shell.chunk}[step]()
        assert len(shell.conv.buffer) <= shell.conv.max_buffer_bytes
    for _ in range(10):  # let whatever is in progress finish
        shell.asr_done()
        shell.tts_done()
    while shell.streaming is not None:
        shell.chunk()
    check_lifecycle(shell)


def check_lifecycle(shell: Shell) -> None:
    """Every response: created once, then done exactly once; no audio after its done; each
    error event counted; a completed response's audio is the whole of what TTS gave."""
    sent = shell.sent
    assert isinstance(sent[0], rt.SessionCreated)
    created = _response_ids(shell)
    assert len(created) == len(set(created))
    done = [e for e in sent if isinstance(e, rt.ResponseDone)]
    assert sorted(e.response_id for e in done) == sorted(created)
    for rid in created:
        at = [i for i, e in enumerate(sent) if getattr(e, "response_id", None) == rid]
        assert isinstance(sent[at[0]], rt.ResponseCreated)
        assert isinstance(sent[at[-1]], rt.ResponseDone)
        audio = b"".join(
            e.pcm for e in sent if isinstance(e, rt.AudioDelta) and e.response_id == rid
        )
        status = next(e.status for e in done if e.response_id == rid)
        if status == "completed":
            assert audio == bytes(7300)
    errors = [e for e in sent if isinstance(e, rt.ServerError)]
    assert sum(shell.stats.errors.values()) == len(errors)
    statuses = [e.status for e in done]
    assert shell.stats.responses == statuses.count("completed")
    assert shell.stats.cancelled == statuses.count("cancelled")


def test_buffer_overflow_clears_the_buffer() -> None:
    shell = Shell(max_buffer_seconds=0.5)  # 12,000 samples
    shell.flush()
    shell.client(rt.input_audio_append(bytes(2 * 10_000)))
    shell.client(rt.input_audio_append(bytes(2 * 2_001)))
    assert isinstance(shell.sent[-1], rt.ServerError) and shell.sent[-1].code == "buffer-overflow"
    assert len(shell.conv.buffer) == 0
    shell.client(rt.input_audio_commit())
    assert shell.sent[-1].code == "commit-empty"


def test_a_second_response_create_while_one_is_active_is_refused() -> None:
    shell = Shell()
    shell.client(rt.input_audio_append(bytes(480)))
    shell.client(rt.input_audio_commit())
    shell.client(rt.response_create())
    job = shell.job
    shell.client(rt.response_create())
    assert shell.sent[-1].code == "active-response" and shell.job is job


@pytest.mark.parametrize("when", ["hearing", "speaking", "streaming"])
def test_cancel_at_any_phase_ends_the_response_once(when: str) -> None:
    shell = Shell()
    shell.client(rt.input_audio_append(bytes(480)))
    shell.client(rt.input_audio_commit())
    shell.client(rt.response_create())
    if when != "hearing":
        shell.asr_done()
    if when == "streaming":
        shell.tts_done()
        shell.chunk()
    shell.client(rt.response_cancel())
    shell.asr_done()
    shell.tts_done()
    shell.chunk()
    check_lifecycle(shell)
    assert [e.status for e in shell.sent if isinstance(e, rt.ResponseDone)] == ["cancelled"]
    assert shell.conv.pending  # the turn is still unanswered: the next response folds it in


def test_a_completed_reply_is_not_repeated_but_an_interrupted_one_is() -> None:
    shell = Shell()
    said = []
    for cancel in (False, True, False):
        shell.client(rt.input_audio_append(bytes(480)))
        shell.client(rt.input_audio_commit())
        shell.client(rt.response_create())
        shell.asr_done()
        said.append(next(e for e in reversed(shell.sent) if isinstance(e, rt.TranscriptDone)))
        shell.tts_done()
        if cancel:
            shell.client(rt.response_cancel())
        while shell.streaming is not None:
            shell.chunk()
    first, second, third = (e.transcript for e in said)
    items = [e.item_id for e in shell.sent if isinstance(e, rt.InputCommitted)]
    assert first == f"You said: words {items[0]}."
    assert second == f"You said: words {items[1]}."
    assert third == f"You said: words {items[1]} words {items[2]}."
    check_lifecycle(shell)
