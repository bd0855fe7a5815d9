"""The demo page in Debian's headless Chromium (Playwright), with a fake microphone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.e2e.test_addresses import UpStackAt
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
  const remote = pc.getReceivers().map((r) => r.track.id);
  const shown = audio.srcObject ? audio.srcObject.getAudioTracks().map((t) => t.id) : [];
  return {energy, state: pc.connectionState,
          playing: !audio.paused && audio.currentTime > 0 && audio.readyState >= 2,
          remoteTrack: shown.length === 1 && remote.includes(shown[0])};
}"""

# What a person reads on the page, once a call has run for a moment.
PAGE_FIGURES = """() => {
  const text = (id) => document.getElementById(id).textContent;
  const value = (id) => document.getElementById(id).value;
  return {state: text("state"), pc: text("pc-state"), ice: text("ice-state"),
          dtls: text("dtls-state"), rtt: text("rtt"), sent: text("sent"),
          lostOut: text("lost-out"), received: text("received"), lostIn: text("lost-in"),
          route: text("route"), levelOut: value("level-out"), levelIn: value("level-in")};
}"""


@contextlib.contextmanager
def chromium_page(tmp_path: Path, extra: tuple[str, ...] = ()) -> Iterator[Page]:
    """A page of headless Chromium with the fake microphone and `extra` flags."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[*FLAGS, *extra],
        )
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def page(tmp_path):
    with chromium_page(tmp_path) as page:
        yield page


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
    assert result["state"] == "connected"
    assert result["remoteTrack"]  # the <audio> element plays the track that came back

    def figures_complete():
        f = page.evaluate(PAGE_FIGURES)
        ready = all(v not in ("-", "") for k, v in f.items() if not k.startswith("level"))
        return f if ready and f["levelOut"] > 0 and f["levelIn"] > 0 else None

    # Every figure filled in (loss out and the RTT need the transceiver's RTCP reports).
    f = wait_for(figures_complete, 10, 0.2, "every figure on the page")
    assert (f["state"], f["pc"], f["ice"], f["dtls"]) == (
        "connected",
        "connected",
        "connected",
        "connected",
    )
    assert f["route"] == f"relay 127.0.0.1:{up_stack.public_port}"  # through the relay
    assert f["rtt"].endswith(" ms") and int(f["sent"]) > 0 and int(f["received"]) > 0
    assert int(f["lostOut"]) == 0 and int(f["lostIn"]) == 0
    assert page.is_hidden("#error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-demo.png"), full_page=True)
    page.click("#hangup")
    page.wait_for_function(
        "() => document.getElementById('state').textContent === 'idle'", timeout=5000
    )


def _talk_until_the_echo_is_heard(page: Page) -> dict:
    page.click("#talk")
    page.wait_for_function(
        "() => window.voicerelay.pc && window.voicerelay.pc.connectionState === 'connected'",
        timeout=15000,
    )

    def echo_heard():
        r = page.evaluate(INBOUND_ENERGY)
        return r if r and (r["energy"] or 0) > 0 and r["playing"] else None

    return wait_for(echo_heard, 15, 0.2, "energy in the echoed audio")


def test_the_page_calls_over_https(tmp_path):
    """`relayctl up --https`: the page over HTTPS (its self-signed certificate accepted, as a
    person accepts it once), a secure context, and the call goes through."""
    extra = ["--https", "--bind", "127.0.0.1", "--advertise", "127.0.0.1"]
    stack = UpStackAt(tmp_path / "state", extra, "127.0.0.1", "https").start()
    try:
        with chromium_page(tmp_path, ("--ignore-certificate-errors",)) as page:
            page.goto(stack.url)
            assert page.evaluate("() => window.isSecureContext") is True
            assert page.is_hidden("#insecure") and page.is_enabled("#talk")
            assert _talk_until_the_echo_is_heard(page)["state"] == "connected"
            page.click("#hangup")
    finally:
        stack.cleanup()


def test_a_page_from_another_host_over_http_says_what_to_do(up_stack, tmp_path):
    """Opened by a name that is not this machine (mapped to loopback here, so nothing leaves
    it) over plain http: no secure context, so no microphone; the page says why and how."""
    rules = "--host-resolver-rules=MAP voicerelay.test 127.0.0.1"
    with chromium_page(tmp_path, (rules,)) as page:
        page.goto(f"http://voicerelay.test:{up_stack.http_port}/")
        assert page.evaluate("() => window.isSecureContext") is False
        notice = page.inner_text("#insecure")
        assert "open it over https" in notice and "relayctl up --https" in notice
        assert "localhost" in notice and notice.count(". ") == 0  # one sentence
        assert page.is_disabled("#talk")


def test_unknown_figures_show_a_dash_and_meters_follow_the_level_in_decibels(up_stack, page):
    page.goto(up_stack.url)
    shown = page.evaluate(
        """() => { const f = window.voicerelay.format;
                   return [f.fmtMs(0), f.fmtMs(undefined), f.fmtMs(NaN), f.fmtMs(0.0123),
                           f.meterValue(0), f.meterValue(0.001), f.meterValue(0.1),
                           f.meterValue(1), f.meterValue(3)]; }"""
    )
    assert shown[:4] == ["-", "-", "-", "12.3 ms"]  # Firefox reports 0 before it measured
    assert shown[4:] == [0, 0, pytest.approx(2 / 3), 1, 1]
    assert page.evaluate("() => document.getElementById('level-in').value") == 0  # at rest


def test_the_page_says_so_when_signaling_is_down(up_stack, page):
    page.goto(up_stack.url)
    up_stack.interrupt()  # the whole stack goes away behind the page's back
    page.click("#talk")
    page.wait_for_selector("#error:not([hidden])", timeout=10000)
    error = page.inner_text("#error")
    assert "Signaling is unreachable" in error and "(relayctl up)" in error  # and what to do
    assert page.inner_text("#state") == "failed"
    assert page.is_enabled("#talk")  # the person can try again


def test_the_page_says_so_when_ice_does_not_connect(no_relay, page):
    """Signaling answers, but nothing listens at the relay address in the answer."""
    page.goto(no_relay.url + "/?connect_timeout=3")
    page.click("#talk")
    page.wait_for_selector("#error:not([hidden])", timeout=15000)
    error = page.inner_text("#error")
    assert "did not complete through the relay" in error or "connection failed" in error, error
    assert f"UDP port at 127.0.0.1:{no_relay.relay.port}" in error  # where it tried
    assert "press Talk again" in error  # what to do
    assert page.inner_text("#state") == "failed"
    page.wait_for_function("() => !document.getElementById('talk').disabled", timeout=5000)
    assert page.is_disabled("#hangup")  # the attempt is over; Talk tries again
    wait_for(  # and the page said so to the server: the session was deleted
        lambda: no_relay.stats()["closed"].get("deleted") == 1, 5, what="the session deleted"
    )
    assert no_relay.stats()["sessions"] == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-ice-failed.png"), full_page=True)
