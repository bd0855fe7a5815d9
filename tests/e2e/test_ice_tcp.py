"""ICE over TCP end to end (issue 12): `relayctl up --tcp-port` serves calls whose client can
only use TCP, with the same relay, envelope and transceiver as UDP calls.

- The project's own client (`relayctl call --tcp`: the client-role `Session` over one RFC
  4571-framed TCP connection, no UDP socket at all) over IPv4 and IPv6 loopback: the tone
  comes back, and the relay carried it over TCP (no UDP flow in its table).
- Debian's Chromium in a client network namespace whose UDP is dropped by nftables, against
  the stack on the root end of a veth pair (10.79.0.1): the page connects over ICE-TCP (the
  selected pair's local candidate is TCP) and hears the echo; the namespace's UDP counter
  shows Chromium tried UDP first. Prefixes 10.79.0.0/24 and fd79::/64 are this file's alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from tests.e2e.conftest import UpStack
from tests.e2e.test_browser import FLAGS
from tests.support import netns
from tests.support.netns import ClientHost
from tests.support.procs import (
    RELAYCTL,
    RelayProcess,
    TransceiverProcess,
    free_ports,
    wait_for,
)
from voicerelay.relay import control
from voicerelay.relay.config import RelayConfig
from voicerelay.transceiver import sdp
from voicerelay.wire.token import write_new_secret

CHROMIUM = "/usr/bin/chromium"
API_KEY = "ice-tcp-test-key-0123456789abcdef"


def tcp_stack(state_dir, bind: str, *extra: str) -> UpStack:
    """`relayctl up --app echo` on `bind` with the relay's ICE-TCP port open (`.tcp_port`)."""
    tcp_port = free_ports(1, socket.SOCK_STREAM)
    stack = UpStack(
        state_dir,
        extra=["--bind", bind, "--advertise", bind, "--tcp-port", str(tcp_port), *extra],
    )
    stack.tcp_port = tcp_port
    return stack


def serving(stack: UpStack) -> UpStack:
    """`stack` once both relay workers listen on its TCP port (the page may answer first)."""

    def listeners() -> int:
        sockets = psutil.net_connections(kind="tcp")
        return sum(
            c.status == psutil.CONN_LISTEN and c.laddr.port == stack.tcp_port for c in sockets
        )

    wait_for(lambda: listeners() == 2, 10, 0.02, "the relay workers' TCP port")
    return stack


def relay_stats(stack: UpStack, bind: str) -> dict[str, Any]:
    config = RelayConfig(listen_host=bind, listen_port=stack.public_port, state_dir=stack.state_dir)
    return control.request(config, "stats")


def relayctl_call(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RELAYCTL, "call", url, *args], capture_output=True, text=True, timeout=timeout
    )


# -- the project's client over TCP only ------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_relayctl_call_tcp_hears_its_tone_over_tcp_alone(tmp_path, bind):
    stack = tcp_stack(tmp_path / "state", bind)
    try:
        serving(stack.start())
        answer = relayctl_call(stack.url, "--tcp", "--json")
        report = json.loads(answer.stdout)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert report["tone_came_back"] and report["purity"] > 0.9
        assert report["candidates"] == [[bind, stack.tcp_port]]  # the answer's TCP candidate
        tcp_line = f"tcp {sdp.tcp_priority(0)} {bind} {stack.tcp_port} typ host tcptype passive"
        udp_line = f"udp {sdp.host_priority(0)} {bind} {stack.public_port} typ host"
        lines = report["answer_sdp"].splitlines()
        assert [i for i, line in enumerate(lines) if udp_line in line] < [
            i for i, line in enumerate(lines) if tcp_line in line
        ]  # TCP listed after UDP
        stats = relay_stats(stack, bind)
        totals = stats["totals"]
        assert totals["tcp_accepted"] == 1 and totals["flows_created"] == 1
        assert stats["table_flows"] == 0  # no UDP flow: everything went over the connection
        assert totals["packets_in"] >= 100 and totals["packets_out"] >= 100
    finally:
        stack.cleanup()


def test_relayctl_call_tcp_says_so_when_the_stack_serves_no_tcp(up_stack):
    answer = relayctl_call(up_stack.url, "--tcp", "--timeout", "3")
    assert answer.returncode == 1
    assert answer.stdout.strip().startswith("call failed: the answer lists no ICE-TCP candidate")
    assert "relayctl up --tcp-port" in answer.stdout


def test_relayctl_call_tcp_names_ice_when_nothing_listens_at_the_tcp_candidate(tmp_path):
    relay = RelayProcess(tmp_path / "state")  # never started: nothing behind the answer
    write_new_secret(relay.secret_file)
    closed = free_ports(1, socket.SOCK_STREAM)
    with TransceiverProcess(relay, extra=["--tcp-port", str(closed)]) as transceiver:
        answer = relayctl_call(transceiver.url, "--tcp", "--timeout", "3")
        assert answer.returncode == 1
        line = answer.stdout.strip()
        assert line.startswith("call failed: ICE over TCP failed: no TCP connection"), line
        assert f"127.0.0.1:{closed}: Connection refused" in line
        wait_for(
            lambda: transceiver.stats()["closed"].get("deleted") == 1, 5, what="the session deleted"
        )


# -- Chromium behind a firewall that drops UDP ------------------------------------------------

BLOCK_UDP = """
table inet voicerelay_no_udp {
  counter udp_dropped {}
  chain output {
    type filter hook output priority 0; policy accept;
    meta l4proto udp counter name udp_dropped drop
  }
  chain input {
    type filter hook input priority 0; policy accept;
    meta l4proto udp drop
  }
}
"""

# The demo-page flags, but a namespace client reaches the stack on a veth address, not loopback.
CHROMIUM_FLAGS = [flag for flag in FLAGS if flag != "--allow-loopback-in-peer-connection"]

CONNECTED = "() => window.voicerelay.pc?.connectionState === 'connected'"
SELECTED_PAIR = """async () => {
  const pc = window.voicerelay.pc;
  if (!pc) return null;
  const audio = document.getElementById("remote");
  const byId = {};
  const report = await pc.getStats();
  report.forEach((s) => { byId[s.id] = s; });
  let energy = null, pair = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") energy = s.totalAudioEnergy;
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const p = byId[s.selectedCandidatePairId];
      const [l, r] = [byId[p.localCandidateId], byId[p.remoteCandidateId]];
      pair = {local: l && {protocol: l.protocol, tcpType: l.tcpType, address: l.address},
              remote: r && {protocol: r.protocol, address: r.address, port: r.port}};
    }
  });
  return {energy, pair, state: pc.connectionState,
          playing: !audio.paused && audio.currentTime > 0 && audio.readyState >= 2};
}"""


def udp_dropped(host: ClientHost) -> int:
    """Packets the namespace's firewall dropped on their way out."""
    out = host.run(
        ["nft", "-j", "list", "counter", "inet", "voicerelay_no_udp", "udp_dropped"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counters = [o["counter"] for o in json.loads(out)["nftables"] if "counter" in o]
    return counters[0]["packets"]


@contextlib.contextmanager
def chromium_without_udp(tmp_path: Path) -> Iterator[tuple[ClientHost, UpStack, Any]]:
    """Chromium in a namespace whose UDP is dropped, in a call (the page connected) to
    `relayctl up --app echo --tcp-port N` on the root end of the veth: (host, stack, page)."""
    with ClientHost("10.79.0.0/24", "fd79::/64") as host:
        host.run(["nft", "-f", "-"], input=BLOCK_UDP, text=True, check=True)
        stack = tcp_stack(tmp_path / "state", host.server_address(), "--api-key", API_KEY)
        try:
            serving(stack.start())
            browser = host.wrapper(CHROMIUM, tmp_path / "chromium-in-netns")
            flags = [*CHROMIUM_FLAGS, f"--unsafely-treat-insecure-origin-as-secure={stack.url}"]
            with sync_playwright() as p:
                context = p.chromium.launch_persistent_context(
                    str(tmp_path / "profile"), executable_path=str(browser), args=flags
                )
                try:
                    page = context.new_page()
                    page.goto(f"{stack.url}/#token={API_KEY}")
                    page.click("#talk")
                    try:
                        page.wait_for_function(CONNECTED, timeout=20000)
                    except PlaywrightTimeout:
                        said = page.inner_text("#state"), page.inner_text("#error")
                        raise AssertionError(f"the page did not connect: {said}") from None
                    yield host, stack, page
                finally:
                    context.close()
        finally:
            stack.cleanup()


def echo_heard(page: Any) -> dict[str, Any]:
    """The call's figures once echoed audio plays (the selected pair, the energy)."""

    def heard() -> dict[str, Any] | None:
        r = page.evaluate(SELECTED_PAIR)
        return r if r and (r["energy"] or 0) > 0 and r["playing"] else None

    return wait_for(heard, 15, 0.2, "energy in the echoed audio")


browser_test = pytest.mark.skipif(
    netns.unavailable() is not None or not os.path.exists(CHROMIUM) or not shutil.which("nft"),
    reason="needs root, chromium and nftables (scripts/install-system-deps.sh)",
)


@pytest.mark.browser
@browser_test
def test_chromium_whose_network_drops_udp_talks_over_ice_tcp(tmp_path):
    with chromium_without_udp(tmp_path) as (host, stack, page):
        result = echo_heard(page)
        stats = relay_stats(stack, host.server_address())  # during the call
        page.click("#hangup")
        dropped = udp_dropped(host)
    assert result["state"] == "connected"
    assert result["pair"]["local"] == {
        "protocol": "tcp",
        "tcpType": "active",
        "address": host.client_address(),
    }
    assert result["pair"]["remote"] == {
        "protocol": "tcp",
        "address": host.server_address(),
        "port": stack.tcp_port,
    }
    totals = stats["totals"]
    assert totals["tcp_flows"] == totals["tcp_connections"] == 1  # the relay carried it...
    assert totals["packets_in"] > 0 and totals["packets_out"] > 0
    assert stats["table_flows"] == 0  # ...and nothing over UDP
    assert dropped > 0  # Chromium tried UDP first; the firewall took it


RECEIVED = """async () => {
  const pc = window.voicerelay.pc, byId = {};
  const report = await pc.getStats();
  report.forEach((s) => { byId[s.id] = s; });
  let packets = null, port = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") packets = s.packetsReceived;
    if (s.type === "transport" && s.selectedCandidatePairId)
      port = byId[byId[s.selectedCandidatePairId].localCandidateId].port;
  });
  return {packets, port, state: pc.connectionState};
}"""


@pytest.mark.browser
@browser_test
def test_chromium_reconnects_over_tcp_when_its_worker_dies_and_the_call_goes_on(tmp_path):
    """A connection dies with its worker; libwebrtc reconnects a TCP pair once, at once: the
    kernel hands the new connection to a surviving worker, which admits its first check by
    the token's mark in shared memory."""
    with chromium_without_udp(tmp_path) as (host, stack, page):
        echo_heard(page)
        holder = wait_for(
            lambda: [
                w
                for w in relay_stats(stack, host.server_address())["workers"]
                if w["counters"]["tcp_connections"]
            ],
            5,
            0.05,
            "the worker holding the connection",
        )[0]
        before = page.evaluate(RECEIVED)
        killed = time.monotonic()
        os.kill(holder["pid"], signal.SIGKILL)

        def resumed() -> dict[str, Any] | None:
            now = page.evaluate(RECEIVED)
            moved = now["port"] not in (None, before["port"])
            return now if moved and now["packets"] > before["packets"] + 5 else None

        after = wait_for(resumed, 5, 0.02, "audio over a new connection")
        gap = time.monotonic() - killed
        later = wait_for(
            lambda: (n := page.evaluate(RECEIVED))["packets"] >= after["packets"] + 50 and n,
            5,
            0.1,
            "a second of audio more",
        )
        stats = relay_stats(stack, host.server_address())
        page.click("#hangup")
    assert gap < 2.0  # measured here: 0.1-1.3 s, typically 0.35 s
    assert later["state"] == "connected" and later["port"] == after["port"]
    survivors = [w for w in stats["workers"] if w["pid"] != holder["pid"]]
    assert sum(w["counters"]["tcp_flows"] for w in survivors) == 1
