"""The voice agent in a real browser: Chromium speaks a WAV made by espeak-ng through relay and
transceiver to the reference agent process; what it hears back is recorded in the page and
transcribed, and must be the agent saying back what was said."""

from __future__ import annotations

import base64
import io
import subprocess
import wave

import av
import numpy as np
import pytest
import soxr
from playwright.sync_api import sync_playwright

from tests.e2e.conftest import UpStack
from tests.e2e.test_browser import ARTIFACTS, CHROMIUM, FLAGS
from voicerelay.agent.asr import Transcriber

pytestmark = pytest.mark.browser

# Whisper tiny.en hears this phrase right through espeak-ng in both voices we tried ("what
# is the weather today" often comes back as "... the winner today": the ASR's limit, not ours).
SAID = "please call me back tomorrow morning"
WORDS = ("call", "back", "tomorrow", "morning")

# Starts recording what the page plays; STOP ends it and returns the webm as base64.
RECORD = """() => { window.voicerelay.recording = (async () => {
  const audio = document.getElementById("remote");
  const recorder = new MediaRecorder(audio.srcObject, {mimeType: "audio/webm;codecs=opus"});
  const chunks = [];
  recorder.ondataavailable = (e) => chunks.push(e.data);
  const stopped = new Promise((resolve) => { recorder.onstop = resolve; });
  recorder.start(100);
  window.voicerelay.stopRecording = () => recorder.stop();
  await stopped;
  const buffer = await new Blob(chunks).arrayBuffer();
  let binary = "";
  const bytes = new Uint8Array(buffer);
  for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
  return btoa(binary);
})(); }"""
STOP = (
    "async () => { window.voicerelay.stopRecording(); return await window.voicerelay.recording; }"
)


def _spoken_wav(path, text: str) -> None:
    """`text` as 48 kHz mono 16-bit, after 2.5 s of silence (the call connects meanwhile)
    and followed by 1 s of it; Chromium plays it once as the microphone."""
    raw = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "130", "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(raw)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        rate = w.getframerate()
    pcm48 = soxr.resample(pcm, rate, 48000).astype(np.int16)
    pcm48 = np.concatenate([np.zeros(120000, np.int16), pcm48, np.zeros(48000, np.int16)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm48.tobytes())


def _decode_webm(data: bytes) -> np.ndarray:
    """A MediaRecorder webm/opus blob as 16 kHz mono int16."""
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        chunks = [
            out.to_ndarray().reshape(-1)
            for frame in container.decode(audio=0)
            for out in resampler.resample(frame)
        ]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


@pytest.fixture
def agent_stack(tmp_path):
    stack = UpStack(tmp_path / "state", app="agent").start()
    yield stack
    stack.cleanup()


def test_chromium_talks_to_the_reference_agent_and_hears_its_words_back(agent_stack, tmp_path):
    wav = tmp_path / "say.wav"
    _spoken_wav(wav, SAID)
    flags = [*FLAGS, f"--use-file-for-fake-audio-capture={wav}%noloop"]
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=flags
        )
        try:
            page = context.new_page()
            page.goto(agent_stack.url)
            page.click("#talk")
            page.wait_for_function(
                "() => window.voicerelay.pc && window.voicerelay.pc.connectionState === 'connected'",
                timeout=15000,
            )
            page.evaluate(RECORD)  # records until told to stop
            page.wait_for_function(
                "() => (window.voicerelay.events || []).some((e) => e.type === 'agent.done')",
                timeout=45000,
            )
            blob = base64.b64decode(page.evaluate(STOP))
            transcript = page.evaluate("() => window.voicerelay.transcript")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-agent.png"), full_page=True)
        finally:
            context.close()

    heard = Transcriber().transcribe(_decode_webm(blob)).lower()
    assert "you said" in heard and all(w in heard for w in WORDS), heard  # our words came back
    you = " ".join(t["text"].lower() for t in transcript if t["who"] == "you")
    agent = " ".join(t["text"].lower() for t in transcript if t["who"] == "agent")
    assert all(w in you for w in WORDS), transcript  # the page shows the person's turn
    assert "you said" in agent and all(w in agent for w in WORDS), transcript
