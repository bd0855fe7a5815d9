"""The demo page in Debian's headless Chromium (Playwright), with a fake microphone."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.support.procs import wait_for

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

INBOUND_ENERGY = """async () => {
  const pc = window.voicerelay.pc;
  if (!pc) return null;
  const audio = document.getElementById("remote");
  let energy = null;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") energy = s.totalAudioEnergy;
  });
  return {energy, playing: !!audio.srcObject && !audio.paused && audio.currentTime > 0,
          state: pc.connectionState};
}"""


@pytest.fixture
def page(tmp_path):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_the_page_talks_through_the_relay_and_hears_the_echo(up_stack, page):
    page.goto(up_stack.url)
    page.click("#talk")
    page.wait_for_function(
        "() => window.voicerelay.pc && window.voicerelay.pc.connectionState === 'connected'",
        timeout=15000,
    )

    def echo_heard():
        r = page.evaluate(INBOUND_ENERGY)
        return r if r and (r["energy"] or 0) > 0 and r["playing"] else None

    result = wait_for(echo_heard, 15, 0.2, "energy in the echoed audio")
    assert result["energy"] > 0 and result["playing"] and result["state"] == "connected"
    page.wait_for_function(
        "() => document.getElementById('received').textContent !== '-'", timeout=5000
    )
    assert page.inner_text("#state") == "connected"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-demo.png"), full_page=True)
    page.click("#hangup")
    page.wait_for_function(
        "() => document.getElementById('state').textContent === 'idle'", timeout=5000
    )


def test_the_page_says_so_when_signaling_is_down(up_stack, page):
    page.goto(up_stack.url)
    up_stack.interrupt()  # the whole stack goes away behind the page's back
    page.click("#talk")
    page.wait_for_selector("#error:not([hidden])", timeout=10000)
    assert "Signaling" in page.inner_text("#error")
    assert page.inner_text("#state") == "failed"
