"""Clients on another host (issue 12): Debian's Chromium, Firefox ESR and werift (npm), each in
a client network namespace, call the stack on the root end of a veth pair, over IPv4 and over
IPv6, and must get audio back (`relayctl up --app echo`).

Each test has its own prefixes (Chromium 10.77.1/fd77:1, Firefox 10.77.2/fd77:2, werift
10.78.1/fd78:1, the client host's own tests 10.77.3-4/fd77:3-4) and removes its namespace and
veth pair however it ends. Nothing is sent to
an address the test did not make (tests/support/netns.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from tests.e2e.conftest import UpStack
from tests.e2e.test_browser import FLAGS
from tests.support import netns
from tests.support.netns import ClientHost, url_host
from tests.support.procs import wait_for
from tests.support.voice import tone_share
from voicerelay.voice.opus import OpusDecoder, OpusEncoder

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
FIREFOX = shutil.which("firefox-esr")
NODE = shutil.which("node")
WERIFT_DIR = HERE / "werift"
SELF_CALL_PAGE = HERE / "web" / "self_call.html"
API_KEY = "other-hosts-test-key-0123456789"

FAMILIES = pytest.mark.parametrize(
    "family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"]
)


# -- the client host itself ------------------------------------------------------------------


def _namespaces() -> list[str]:
    out = subprocess.run([netns.IP, "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return subprocess.run([netns.IP, "link", "show", name], capture_output=True).returncode == 0


def test_a_client_host_reaches_the_root_end_and_is_removed_when_its_test_fails():
    host = ClientHost("10.77.3.0/24", "fd77:3::/64")
    with pytest.raises(RuntimeError, match="the test fails"), host:
        for family in (socket.AF_INET, socket.AF_INET6):
            with socket.socket(family, socket.SOCK_DGRAM) as server:
                server.bind((host.server_address(family), 0))
                server.settimeout(5)
                to = (host.server_address(family), server.getsockname()[1])
                send = f"import socket; socket.socket({int(family)}, 2).sendto(b'hi', {to!r})"
                host.run([sys.executable, "-c", send], check=True, timeout=10)
                data, source = server.recvfrom(16)
                assert (data, source[0]) == (b"hi", host.client_address(family))
        sleeper = host.popen(["sleep", "60"])
        wait_for(lambda: sleeper.pid in host.pids(), 5, 0.01, "sleep inside the namespace")
        raise RuntimeError("the test fails")  # with a process still running inside
    assert sleeper.wait(5) == -9
    assert host.name not in _namespaces()
    assert not _link_exists(host.host_if)


def test_a_dead_runs_namespace_is_removed_and_a_live_runs_prefix_refused():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"vrt-77-4-{dead.pid}"  # what a run killed with SIGKILL leaves behind
    subprocess.run([netns.IP, "netns", "add", stale], check=True)
    veth = ["vr77x4h", "type", "veth", "peer", "name", "vr77x4c", "netns", stale]
    subprocess.run([netns.IP, "link", "add", *veth], check=True)
    with ClientHost("10.77.4.0/24", "fd77:4::/64") as host:
        assert stale not in _namespaces() and host.name in _namespaces()
    live = "vrt-77-4-1"  # pid 1 lives and is not this test
    subprocess.run([netns.IP, "netns", "add", live], check=True)
    try:
        with pytest.raises(RuntimeError, match="in use by namespace vrt-77-4-1"):
            ClientHost("10.77.4.0/24", "fd77:4::/64", owner_wait=0.3).__enter__()
    finally:
        subprocess.run([netns.IP, "netns", "del", live], check=True)
    assert not [n for n in _namespaces() if n.startswith("vrt-77-4-")]


# -- the stack on the root end of the veth ----------------------------------------------------


@contextlib.contextmanager
def stack_on(
    host: ClientHost, family: int, state_dir: Path, cors_origin: str | None = None
) -> Iterator[UpStack]:
    """`relayctl up --app echo` bound to and advertising the root end of `host`'s veth."""
    address = host.server_address(family)
    extra = ["--bind", address, "--advertise", address, "--api-key", API_KEY]
    if cors_origin:
        extra += ["--cors-origin", cors_origin]
    stack = UpStack(state_dir, extra=extra)
    try:
        yield stack.start()
    finally:
        stack.cleanup()


def client_token(stack: UpStack) -> str:
    """A single-use client token, minted with the API key as an app's backend does."""
    request = urllib.request.Request(
        stack.url + "/v1/client_tokens",
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["value"]


def relay_address(stack: UpStack, family: int, host: ClientHost) -> str:
    """The relay's public address as getStats shows a remote candidate."""
    return f"{host.server_address(family)}:{stack.public_port}"


# -- Chromium (Playwright) --------------------------------------------------------------------

# The demo-page flags, but a namespace client reaches the stack on a veth address, not loopback.
CHROMIUM_FLAGS = [flag for flag in FLAGS if flag != "--allow-loopback-in-peer-connection"]

CONNECTED = "() => window.voicerelay.pc?.connectionState === 'connected'"
INBOUND = """async () => {
  const pc = window.voicerelay.pc;
  if (!pc) return null;
  const audio = document.getElementById("remote");
  let energy = null, remote = null, local = null;
  const byId = {};
  const report = await pc.getStats();
  report.forEach((s) => { byId[s.id] = s; });
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") energy = s.totalAudioEnergy;
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const pair = byId[s.selectedCandidatePairId];
      const [r, l] = [byId[pair.remoteCandidateId], byId[pair.localCandidateId]];
      if (r) remote = `${r.address}:${r.port}`;
      if (l) local = l.address;
    }
  });
  return {energy, remote, local, state: pc.connectionState,
          playing: !audio.paused && audio.currentTime > 0 && audio.readyState >= 2};
}"""


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium (Debian package) is missing")
@FAMILIES
def test_chromium_on_another_host_talks_and_hears_the_echo(tmp_path, family):
    with (
        ClientHost("10.77.1.0/24", "fd77:1::/64") as host,
        stack_on(host, family, tmp_path / "state") as stack,
    ):
        browser = host.wrapper(CHROMIUM, tmp_path / "chromium-in-netns")
        flags = [*CHROMIUM_FLAGS, f"--unsafely-treat-insecure-origin-as-secure={stack.url}"]
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(browser), headless=True, args=flags
            )
            try:
                page = context.new_page()
                page.goto(f"{stack.url}/#token={client_token(stack)}")
                page.click("#talk")
                try:
                    page.wait_for_function(CONNECTED, timeout=15000)
                except PlaywrightTimeout:
                    said = page.inner_text("#state"), page.inner_text("#error")
                    raise AssertionError(f"the page did not connect: {said}") from None

                def echo_heard() -> dict[str, Any] | None:
                    r = page.evaluate(INBOUND)
                    return r if r and (r["energy"] or 0) > 0 and r["playing"] else None

                result = wait_for(echo_heard, 15, 0.2, "energy in the echoed audio")
                page.click("#hangup")
            finally:
                context.close()
    assert result["state"] == "connected"
    assert result["remote"] == relay_address(stack, family, host)  # through the relay, on the veth
    assert result["local"] == host.client_address(family)  # from the other host


# -- Firefox ESR (a self-running page; Playwright cannot drive Debian's Firefox) -------------

FIREFOX_SECONDS = 25  # start-up, a call and its figures take 2-4 s here
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,  # a tone as the microphone
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    # quiet: no first-run pages, no background connections (they could not leave anyway)
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "extensions.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
}


def firefox_profile(directory: Path, secure_host: str) -> Path:
    """A profile whose user.js fakes the microphone and treats `secure_host` (the test page's
    host, plain HTTP) as a secure context, as Chromium's --unsafely-treat-insecure-origin-as-
    secure does."""
    directory.mkdir(parents=True)
    prefs = {**FIREFOX_PREFS, "dom.securecontext.allowlist": secure_host}
    lines = [f"user_pref({json.dumps(k)}, {json.dumps(v)});" for k, v in prefs.items()]
    (directory / "user.js").write_text("\n".join(lines) + "\n")
    return directory


def start_firefox(host: ClientHost, profile: Path, url: str, log: Path) -> subprocess.Popen:
    """Headless Firefox ESR in `host`'s namespace opening `url`, ended by `timeout` at the
    latest (the namespace's teardown ends it too)."""
    argv = [FIREFOX, "--headless", "--no-remote", "--profile", str(profile), url]
    with open(log, "wb") as out:
        return host.popen(
            ["timeout", str(FIREFOX_SECONDS), *argv],
            env={**os.environ, "HOME": str(profile.parent), "MOZ_HEADLESS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


class PageServer:
    """Serves the self-running call page and takes the results it POSTs to /result."""

    def __init__(self, address: str) -> None:
        self.results: queue.Queue[dict[str, Any]] = queue.Queue()
        page = SELF_CALL_PAGE.read_bytes()
        results = self.results

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path.split("?")[0] != "/call.html":
                    self.send_error(404)
                    return
                self._reply(200, "text/html; charset=utf-8", page)

            def do_POST(self) -> None:  # noqa: N802
                size = int(self.headers.get("Content-Length") or 0)
                try:
                    if self.path != "/result" or not 0 < size <= 65536:
                        raise ValueError(f"POST {self.path} of {size} bytes")
                    result = json.loads(self.rfile.read(size))
                except ValueError as e:
                    results.put({"ok": False, "step": "post", "error": str(e)})
                    self.send_error(400)
                    return
                results.put(result)
                self._reply(204, "text/plain", b"")

            def _reply(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            daemon_threads = True

            def server_bind(self) -> None:  # HTTPServer's, less its reverse DNS lookup
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

        self.server = Server((address, 0), Handler)
        self.origin = f"http://{url_host(address)}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the page posted no result within {timeout} s") from None


@pytest.mark.browser
@pytest.mark.skipif(FIREFOX is None, reason="firefox-esr (Debian package) is not installed")
@FAMILIES
def test_firefox_on_another_host_talks_and_hears_the_echo(tmp_path, family):
    with (
        ClientHost("10.77.2.0/24", "fd77:2::/64") as host,
        PageServer(host.server_address(family)) as pages,
        stack_on(host, family, tmp_path / "state", cors_origin=pages.origin) as stack,
    ):
        profile = firefox_profile(tmp_path / "firefox", host.server_address(family))
        query = urllib.parse.urlencode({"signaling": stack.url, "token": client_token(stack)})
        log = tmp_path / "firefox.log"
        firefox = start_firefox(host, profile, f"{pages.origin}/call.html?{query}", log)
        try:
            result = pages.result(FIREFOX_SECONDS)
        except AssertionError as e:
            raise AssertionError(f"{e}; Firefox said: {log.read_text()[-1500:]}") from None
        finally:
            firefox.kill()
            firefox.wait(10)
    assert result["ok"], result
    assert "Firefox" in result["userAgent"]
    assert result["connectionState"] == "connected", result
    inbound = result["inbound"]
    assert inbound["packetsReceived"] >= 25 and inbound["bytesReceived"] > 0, result  # 0.5 s
    assert inbound["totalAudioEnergy"] > 0 and inbound["audioLevel"] > 0, result  # not silence
    assert result["remoteCandidate"] == relay_address(stack, family, host), result
    # Firefox hides its own address behind an mDNS name; the server saw where it came from.
    assert result["session"]["remote"][0] == host.client_address(family), result
    assert result["deleteStatus"] == 204, result  # hung up across origins too


# -- werift (npm): a third, independent WebRTC stack -----------------------------------------


def tone_frames(freq: float = 440.0, seconds: float = 2.0) -> list[bytes]:
    """A tone as 20 ms Opus packets, as a microphone would send it."""
    encoder = OpusEncoder()
    t = np.arange(int(48000 * seconds)) / 48000
    pcm = (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)
    return [encoder.encode(pcm[i : i + 960]) for i in range(0, pcm.size - 959, 960)]


@pytest.mark.skipif(
    NODE is None or not (WERIFT_DIR / "node_modules" / "werift").is_dir(),
    reason="werift is not installed (node and `make install`: npm ci --prefix tests/e2e/werift)",
)
@FAMILIES
def test_werift_on_another_host_gets_its_opus_echoed(tmp_path, family):
    frames = tone_frames()
    frames_file = tmp_path / "frames.hex"
    frames_file.write_text("".join(f.hex() + "\n" for f in frames))
    with (
        ClientHost("10.78.1.0/24", "fd78:1::/64") as host,
        stack_on(host, family, tmp_path / "state") as stack,
    ):
        ip_version = "4" if family == socket.AF_INET else "6"
        script = str(WERIFT_DIR / "call.js")
        run = host.run(
            [NODE, script, stack.url, client_token(stack), str(frames_file), ip_version],
            capture_output=True,
            text=True,
            timeout=25,
        )
    assert run.stdout, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["ok"], result
    assert result["session"]["remote"][0] == host.client_address(family)  # from the other host
    echoed = [bytes.fromhex(e) for e in result["echoed"]]
    assert len(echoed) >= 0.9 * len(frames), f"{len(echoed)} of {len(frames)} came back"
    assert set(echoed) <= set(frames)  # each one byte for byte a packet werift sent
    decoder = OpusDecoder()
    pcm = np.concatenate([decoder.decode(e) for e in echoed])
    assert tone_share(pcm, (440.0,), 48000) > 0.9  # and it is the tone
