"""`relayctl up` with the reference agent, called by `relayctl call --play` (aiortc) through the
relay: a turn is answered, and speaking over the answer cuts it and truncates it upstream."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import wave

import numpy as np
import pytest

from tests.e2e.conftest import UpStack
from tests.support.procs import RELAYCTL
from tests.support.voice import silence, speech

SAID = "please call me back tomorrow morning"


@pytest.fixture(scope="module")
def agent_up(tmp_path_factory):
    stack = UpStack(tmp_path_factory.mktemp("agent") / "state", app="agent").start()
    yield stack
    stack.cleanup()


def _write_wav(path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm.tobytes())


def _call(stack: UpStack, wav, tmp_path) -> dict:
    record = tmp_path / "back.wav"
    out = subprocess.run(
        [*RELAYCTL, "call", stack.url, "--play", str(wav), "--record", str(record), "--json"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _agent_stats(stack: UpStack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.agent_port}/v1/stats") as r:
        return json.load(r)


def test_a_turn_is_answered_with_what_was_said(agent_up, tmp_path):
    wav = tmp_path / "say.wav"
    _write_wav(wav, np.concatenate([speech(SAID), silence(0.5)]))
    report = _call(agent_up, wav, tmp_path)
    (turn,) = report["turns"]
    assert not turn["overlap"] and turn["response_ms"] is not None
    assert turn["response_ms"] < 3000  # endpointing + ASR + TTS + the way back
    texts = " ".join(t["text"].lower() for t in report["transcripts"])
    assert "you said" in texts and "tomorrow morning" in texts


def test_speaking_over_the_answer_cuts_it_and_truncates_it(agent_up, tmp_path):
    before = _agent_stats(agent_up)
    # the turn, then (while the ~3 s answer plays) the person speaks again
    wav = tmp_path / "barge.wav"
    _write_wav(wav, np.concatenate([speech(SAID), silence(1.8), speech("no wait"), silence(0.5)]))
    report = _call(agent_up, wav, tmp_path)
    (cut,) = [e for e in report["events"] if e["type"] == "agent.interrupted"]
    assert 0 < cut["sent_ms"] < 3000
    speaking = [e for e in report["events"] if e["type"] == "user.speech_started"]
    assert speaking[-1]["at_ms"] <= cut["at_ms"] <= speaking[-1]["at_ms"] + 100
    # the reply that was playing stopped as the person spoke over it
    spoken = report["spoken"]
    interrupted = [r for r in report["replies"] if r["start_s"] < spoken[1]["start_s"]]
    assert interrupted and interrupted[-1]["end_s"] - spoken[1]["start_s"] < 0.3
    after = _agent_stats(agent_up)
    assert after["truncations"] - before["truncations"] == 1  # the backend was told
    assert after["truncated_audio_end_ms"][-1] == cut["sent_ms"]
