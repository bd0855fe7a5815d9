"""Transceiver vs Janus EchoTest vs an aiortc echo server, in one run: CPU per call, calls a core
at < 0.1 % loss, setup time (offer to first echoed audio).

    .venv/bin/python bench/peer_janus.py [--quick] [--peers transceiver,janus,aiortc]

The same call load on every peer (bench/peer_aiortc.py's, which this reuses): the project's
client-role `Session` (`ClientCall`, one UDP socket a call, one uvloop loop, one 20 ms ticker
for all), one real 56-byte Opus frame every 20 ms each way a call; each peer echoes it.
- `transceiver`: voicerelay's transceiver, echo app, called on its internal port in relay
  envelopes (no relay in front of it, as none is in front of the others).
- `janus`: Debian's Janus (1.1.2 here), EchoTest plugin, HTTP API. A call: create a session,
  attach `janus.plugin.echotest`, send `{"audio": true}` with the offer, read the answer from
  the long-poll (`GET /janus/<session>`); hanging up destroys the session. Janus does full ICE:
  it checks the client and starts DTLS only once its checks are answered, which the client's
  `Session` does. Janus skips loopback when it gathers candidates, so it runs in a network
  namespace of its own (`vrbench-janus-<pid>`, 10.77.0.1/24) joined by a veth pair to a second
  one (`vrbench-calls-<pid>`, 10.77.0.2/24) where this load client runs; nothing is attached to
  the machine's own interfaces, and both namespaces go at exit, also on failure. Janus gets a
  config directory of its own (`janus -F`): only the HTTP transport and the EchoTest plugin,
  ICE on the veth only, no session timeout, its log in bench/results/peer_janus.janus.log.
  Loss each way from its Admin API (`handle_info`: packets in and out a call).
- `aiortc`: bench/aiortc_echo_server.py (decodes and re-encodes what it echoes).
With Janus in the run, this script runs itself again inside the calls' namespace, and the
transceiver and aiortc run there too, on that namespace's loopback: every peer is called by the
same process. Each server alone on the core under test (its threads included), the load client
on the other.

Per peer, as in peer_aiortc.py: setup (calls one at a time, the peers alternating: offer ->
answer -> DTLS up -> first echoed audio; for Janus the offer is the `message` carrying it, after
its session and handle exist), then a ramp of call counts with a measured window per step, until
>= 0.1 % loss, a failed setup, a saturated core or a load client behind its ticker. Calls a core:
MEASURED (largest step under 0.1 % loss, the load fully offered) and EXTRAPOLATED (one core / the
server's CPU a call at that step). Budgets (issue 14): transceiver calls a core >= 3x Janus's and
>= 10x aiortc's, printed PASS/MISS for both figures (MEASURED is "open" when a ramp that stopped
at the load client, a floor, decides it). A peer that is missing is skipped with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import harness
import psutil
from loadclient import Counts
from peer_aiortc import (
    Peer,
    PeerLoadClient,
    load_line,
    measure_peers,
    peers,
    step_table,
)

from tests.support.netns import IP, remove_namespace, run_ip
from tests.support.procs import wait_for
from voicerelay.transceiver.client import ClientCall

PEERS = ("transceiver", "janus", "aiortc")
STEPS = {
    "transceiver": (100, 200, 400, 600, 800, 1000, 1200),
    "janus": (50, 100, 200, 400, 600, 800, 1000, 1200),
    "aiortc": (5, 10, 20, 30, 40, 60),
}
QUICK_STEPS = {"transceiver": (50, 100), "janus": (50, 100), "aiortc": (5, 10)}
BUDGETS = {"janus": 3.0, "aiortc": 10.0}  # transceiver calls a core >= this x theirs
PREFIX = "vrbench"  # namespaces and veth ends this benchmark makes carry it, and its pid
NET = ipaddress.IPv4Network("10.77.0.0/24")  # test-only, inside our namespaces only
JANUS_ADDR, CALLS_ADDR = str(NET.network_address + 1), str(NET.network_address + 2)
JANUS_PORT, ADMIN_PORT = 8088, 7088
JANUS_LIB = next(iter(sorted(Path("/usr/lib").glob("*/janus"))), Path("/usr/lib/janus"))
JANUS_LOG = harness.RESULTS / "peer_janus.janus.log"


# Network namespaces ---------------------------------------------------------------------------
class JanusNet:
    """Two network namespaces joined by a veth pair: Janus's (10.77.0.1) and the calls'
    (10.77.0.2), each with loopback up. Both ends of the veth live inside them: nothing is
    added to the machine's own namespace but the two names. `destroy` stops what runs inside
    and removes both (the veth goes with them)."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.janus_ns, self.calls_ns = f"{PREFIX}-janus-{owner}", f"{PREFIX}-calls-{owner}"
        self.janus_if, self.calls_if = f"vrbj{owner}", f"vrbc{owner}"  # <= 15 characters
        self.created = False

    def create(self) -> JanusNet:
        remove_leftovers()
        self.created = True
        run_ip("netns", "add", self.janus_ns)
        run_ip("netns", "add", self.calls_ns)
        run_ip(
            "link",
            "add",
            self.janus_if,
            "netns",
            self.janus_ns,
            "type",
            "veth",
            "peer",
            "name",
            self.calls_if,
            "netns",
            self.calls_ns,
        )
        for ns, ifname, addr in (
            (self.janus_ns, self.janus_if, JANUS_ADDR),
            (self.calls_ns, self.calls_if, CALLS_ADDR),
        ):
            run_ip("-n", ns, "addr", "add", f"{addr}/{NET.prefixlen}", "dev", ifname)
            run_ip("-n", ns, "link", "set", ifname, "up")
            run_ip("-n", ns, "link", "set", "lo", "up")
        return self

    def janus_command(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.janus_ns, *argv]

    def calls_command(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.calls_ns, *argv]

    def destroy(self) -> None:
        if self.created:
            for ns in (self.janus_ns, self.calls_ns):
                remove_namespace(ns)
            self.created = False

    def __enter__(self) -> JanusNet:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def remove_leftovers() -> None:
    """Remove namespaces of this benchmark whose owner process is gone (a killed run)."""
    pattern = re.compile(rf"{PREFIX}-(?:janus|calls)-(\d+)$")
    for line in run_ip("netns", "list", check=False).stdout.splitlines():
        match = pattern.match(line.split()[0]) if line.strip() else None
        if match and not psutil.pid_exists(int(match.group(1))):
            remove_namespace(match.group(0))


def janus_unavailable() -> str | None:
    """Why Janus cannot run here (one line), or None."""
    if shutil.which("janus") is None:
        return "`janus` is not installed (bash bench/peers_setup.sh installs Debian's)"
    if not (JANUS_LIB / "plugins" / "libjanus_echotest.so").exists():
        return f"the EchoTest plugin is not in {JANUS_LIB}/plugins"
    if not Path(IP).exists():
        return "the `ip` command (Debian package iproute2) is missing"
    if os.geteuid() != 0:
        return "its network namespaces need root"
    return None


def janus_version() -> str:
    out = subprocess.run(["janus", "--version"], capture_output=True, text=True, timeout=10)
    match = re.search(r"Janus version: \d+ \(([^)]+)\)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


# Janus: configuration and process -------------------------------------------------------------
def write_config(folder: Path, *, admin_secret: str, ifname: str, event_loops: int) -> Path:
    """A configuration directory of Janus's own: the core, the HTTP transport (API and Admin
    API on the veth address), the EchoTest plugin; plugin and transport folders holding only
    those two libraries. Returns the core's config file."""
    for sub in ("plugins", "transports", "events", "loggers"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "plugins" / "libjanus_echotest.so").symlink_to(
        JANUS_LIB / "plugins" / "libjanus_echotest.so"
    )
    (folder / "transports" / "libjanus_http.so").symlink_to(
        JANUS_LIB / "transports" / "libjanus_http.so"
    )
    loops = f"\tevent_loops = {event_loops}\n" if event_loops else ""
    core = folder / "janus.jcfg"
    core.write_text(
        "general: {\n"
        f'\tconfigs_folder = "{folder}"\n'
        f'\tplugins_folder = "{folder / "plugins"}"\n'
        f'\ttransports_folder = "{folder / "transports"}"\n'
        f'\tevents_folder = "{folder / "events"}"\n'
        f'\tloggers_folder = "{folder / "loggers"}"\n'
        "\tdebug_level = 4\n"
        f'\tadmin_secret = "{admin_secret}"\n'
        "\tsession_timeout = 0\n"
        f"{loops}"
        "}\n"
        "certificates: {\n}\n"
        "media: {\n}\n"
        "nat: {\n"
        "\tnice_debug = false\n"
        f'\tice_enforce_list = "{ifname}"\n'
        "\tignore_mdns = true\n"
        "}\n"
        "plugins: {\n}\ntransports: {\n}\nloggers: {\n}\nevents: {\n}\n"
    )
    (folder / "janus.transport.http.jcfg").write_text(
        "general: {\n"
        '\tjson = "compact"\n'
        '\tbase_path = "/janus"\n'
        "\thttp = true\n"
        f"\tport = {JANUS_PORT}\n"
        f'\tip = "{JANUS_ADDR}"\n'
        "\thttps = false\n"
        "}\n"
        "admin: {\n"
        '\tadmin_base_path = "/admin"\n'
        "\tadmin_http = true\n"
        f"\tadmin_port = {ADMIN_PORT}\n"
        f'\tadmin_ip = "{JANUS_ADDR}"\n'
        "\tadmin_https = false\n"
        "}\n"
        "cors: {\n}\n"
    )
    (folder / "janus.plugin.echotest.jcfg").write_text("general: {\n\tevents = false\n}\n")
    return core


class JanusAdmin:
    """Janus's Admin API (blocking calls: run them in a thread from the event loop)."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.secret = secret

    def request(self, path: str, janus: str) -> dict[str, Any]:
        body = {"janus": janus, "transaction": secrets.token_hex(6), "admin_secret": self.secret}
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            reply = json.loads(r.read())
        if reply.get("janus") != "success":
            raise RuntimeError(f"janus admin {janus}: {reply.get('error', reply)}")
        return reply

    def sessions(self) -> int:
        return len(self.request("", "list_sessions").get("sessions", []))

    def rtp_counts(self, session: int, handle: int) -> tuple[int, int]:
        """RTP packets the call's handle received and sent (its media's own statistics)."""
        info = self.request(f"/{session}/{handle}", "handle_info").get("info", {})
        got = sent = 0
        for media in info.get("webrtc", {}).get("media", {}).values():
            stats = media.get("stats", {})
            got += stats.get("in", {}).get("packets", 0)
            sent += stats.get("out", {}).get("packets", 0)
        return got, sent


@contextlib.contextmanager
def janus_server(net: JanusNet, core: int, event_loops: int) -> Iterator[Peer]:
    """Janus in its namespace with its own configuration, pinned (threads too) to `core`."""
    admin_secret = secrets.token_hex(16)
    url = f"http://{JANUS_ADDR}:{JANUS_PORT}/janus"
    admin = JanusAdmin(f"http://{JANUS_ADDR}:{ADMIN_PORT}/admin", admin_secret)
    with tempfile.TemporaryDirectory(prefix="voicerelay-janus-") as tmp:
        config = write_config(
            Path(tmp), admin_secret=admin_secret, ifname=net.janus_if, event_loops=event_loops
        )
        JANUS_LOG.parent.mkdir(parents=True, exist_ok=True)
        JANUS_LOG.unlink(missing_ok=True)
        cmd = net.janus_command(
            ["janus", "-F", tmp, "-C", str(config), "-L", str(JANUS_LOG), "-N", "-o"]
        )
        with harness.process(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),  # every thread inherits it
        ) as proc:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"janus exited with {proc.returncode} (see {JANUS_LOG})")
                with (
                    contextlib.suppress(OSError, ValueError),
                    urllib.request.urlopen(url + "/info", timeout=1) as r,
                ):
                    return json.loads(r.read()).get("janus") == "server_info"
                return False

            wait_for(ready, 30, 0.05, "janus to answer /janus/info")
            harness.pin(proc.pid, core)
            yield Peer(
                "janus",
                url,
                proc.pid,
                JanusCall,
                None,
                admin.sessions,
                client_class=functools.partial(JanusLoadClient, admin=admin),
                local_host=CALLS_ADDR,
            )


# Janus: the calls -----------------------------------------------------------------------------
async def janus_post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict:
    """One Janus API request; raises RuntimeError on a Janus error."""
    body = {**body, "transaction": secrets.token_hex(6)}
    async with http.post(url, json=body) as resp:
        reply = await resp.json(content_type=None)
    if reply.get("janus") == "error":
        raise RuntimeError(f"janus {body['janus']}: {reply.get('error', {}).get('reason')}")
    return reply


class JanusCall(ClientCall):
    """A `ClientCall` that speaks Janus's HTTP API to the EchoTest plugin; `close` (from the
    event loop) also destroys its Janus session, in the background: the peer's session count
    shows when those are done."""

    closing: set[asyncio.Task] = set()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.session_id = self.handle_id = 0
        self._http: aiohttp.ClientSession | None = None
        self._session_url = ""

    async def exchange(self, http: aiohttp.ClientSession, url: str, offer: str) -> str:
        """Create a session, attach EchoTest, send `{"audio": true}` with the offer, return the
        answer from the long-poll. The offer counts as posted when its message goes out."""
        self._http = http
        created = await janus_post(http, url, {"janus": "create"})
        self.session_id = created["data"]["id"]
        self._session_url = f"{url}/{self.session_id}"
        attached = await janus_post(
            http, self._session_url, {"janus": "attach", "plugin": "janus.plugin.echotest"}
        )
        self.handle_id = attached["data"]["id"]
        self.location = f"{self._session_url}/{self.handle_id}"
        self.posted_at = self.clock()
        message = {
            "janus": "message",
            "body": {"audio": True, "video": False},
            "jsep": {"type": "offer", "sdp": offer},
        }
        await janus_post(http, self.location, message)
        return await self._answer(http)

    async def _answer(self, http: aiohttp.ClientSession) -> str:
        """Long-poll the session until the event carrying the answer arrives."""
        while True:
            async with http.get(self._session_url, params={"maxev": "5"}) as resp:
                events = await resp.json(content_type=None)
            for event in events if isinstance(events, list) else [events]:
                jsep = event.get("jsep")
                if jsep and jsep.get("type") == "answer":
                    return jsep["sdp"]
                if event.get("janus") in ("hangup", "detached", "error"):
                    raise RuntimeError(f"janus: {event.get('janus')} before the answer")

    def close(self) -> None:
        super().close()
        http, url = self._http, self._session_url
        if http is None or not url or http.closed:
            return
        self._http = None
        task = asyncio.get_running_loop().create_task(_destroy(http, url))
        JanusCall.closing.add(task)
        task.add_done_callback(JanusCall.closing.discard)


async def _destroy(http: aiohttp.ClientSession, session_url: str) -> None:
    with contextlib.suppress(aiohttp.ClientError, RuntimeError, asyncio.TimeoutError):
        await janus_post(http, session_url, {"janus": "destroy"})


class JanusLoadClient(PeerLoadClient):
    """The peer load client for Janus: the server's counts come from its Admin API."""

    def __init__(self, *args: Any, admin: JanusAdmin, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.admin = admin

    async def server_counts(self, concurrency: int = 50) -> Counts:
        """Client counts plus each call's handle counters (audio packets in and out)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(call: ClientCall) -> tuple[int, int]:
            assert isinstance(call, JanusCall)
            async with gate:
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    return await asyncio.to_thread(
                        self.admin.rtp_counts, call.session_id, call.handle_id
                    )
                return 0, 0

        counts = self.client_counts()
        pairs = await asyncio.gather(*(one(c) for c in self.calls))
        counts.server_in = sum(p[0] for p in pairs)
        counts.server_out = sum(p[1] for p in pairs)
        return counts


# Figures --------------------------------------------------------------------------------------
def peer_summary(result: dict[str, Any]) -> dict[str, Any]:
    times = result["setup"]
    return {
        **result["capacity"],
        "ramp_stopped_by": result["stopped"],
        "setup_calls": len(times.first_echo),
        "setup_failures": len(times.failures),
        "setup_echo_p50_ms": harness.percentile(times.first_echo, 50),
        "setup_echo_p95_ms": harness.percentile(times.first_echo, 95),
        "setup_secure_p50_ms": harness.percentile(times.secure, 50),
    }


def ratio(ours: Any, theirs: Any) -> float | None:
    if isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs:
        return ours / theirs
    return None


def server_bound(stopped: str) -> bool:
    """True if a ramp stopped at the server (loss, failed setups, its core full): its
    MEASURED calls are then the server's; otherwise (the load client fell behind or was
    saturated, or the steps ran out) they are only a floor."""
    return stopped.startswith(("loss", "setup failed", "server saturated"))


def cpu_at_same_calls(ours: list[Any], theirs: list[Any]) -> dict[int, float]:
    """Their CPU a call / ours at each call count both ramps measured under the loss limit."""
    mine = {s.calls: s.server_cpu_per_call for s in ours if s.ok}
    return {
        s.calls: s.server_cpu_per_call / mine[s.calls] for s in theirs if s.ok and mine.get(s.calls)
    }


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each peer's headline figures, and the transceiver against each other peer."""
    out: dict[str, Any] = {name: peer_summary(r) for name, r in results.items()}
    ours = out.get("transceiver")
    comparisons = {}
    for other, budget in BUDGETS.items():
        theirs = out.get(other)
        if ours is None or theirs is None:
            continue
        by_cpu = ratio(
            ours.get("extrapolated_calls_per_core"), theirs.get("extrapolated_calls_per_core")
        )
        measured = ratio(ours.get("measured_calls"), theirs.get("measured_calls"))
        bounds = (server_bound(ours["ramp_stopped_by"]), server_bound(theirs["ramp_stopped_by"]))
        comparisons[other] = {
            "budget": budget,
            "calls_a_core_by_cpu": by_cpu,
            "calls_measured": measured,
            "verdict_by_cpu": verdict(by_cpu, budget),
            "verdict_measured": measured_verdict(measured, budget, *bounds),
            "cpu_per_call": ratio(
                theirs.get("server_cpu_per_call"), ours.get("server_cpu_per_call")
            ),
            "cpu_per_call_at_same_calls": cpu_at_same_calls(
                results["transceiver"]["steps"], results[other]["steps"]
            ),
            "setup_echo_p50": ratio(theirs["setup_echo_p50_ms"], ours["setup_echo_p50_ms"]),
        }
    out["transceiver_vs"] = comparisons
    return out


def verdict(value: float | None, budget: float) -> str:
    if value is None:
        return "-"
    return "PASS" if value >= budget else "MISS"


def measured_verdict(
    value: float | None, budget: float, ours_exact: bool, theirs_exact: bool
) -> str:
    """PASS/MISS on MEASURED calls, when the ramps allow it: a ratio over their floor proves
    no PASS, one under our floor proves no MISS ("open")."""
    if value is None:
        return "-"
    if value >= budget:
        return "PASS" if theirs_exact else "open: theirs a floor"
    return "MISS" if ours_exact else "open: ours a floor"


def setup_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in results.items():
        t = r["setup"]
        rows.append(
            [
                name,
                len(t.first_echo),
                len(t.failures),
                harness.percentile(t.answered, 50),
                harness.percentile(t.secure, 50),
                harness.percentile(t.first_echo, 50),
                harness.percentile(t.first_echo, 95),
            ]
        )
    return harness.table(
        "Setup: offer -> milestone, ms (calls one at a time, the peers alternating)",
        ["peer", "calls", "failed", "answer p50", "secure p50", "echo p50", "echo p95"],
        rows,
    )


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return (
        "-" if not isinstance(value, int | float) or value != value else f"{value:{spec}}{suffix}"
    )


def summary_table(s: dict[str, Any], names: list[str]) -> str:
    figures = (
        ("CPU a call, % of a core", "server_cpu_per_call", lambda v: _fmt(100 * v, ".3f")),
        ("us of server CPU an echo", "server_us_per_echo", lambda v: _fmt(v, ".1f")),
        ("calls a core by CPU (EXTRAPOLATED)", "extrapolated_calls_per_core", "{:,.0f}".format),
        ("calls at < 0.1 % loss (MEASURED)", "measured_calls", "{:,}".format),
        ("server core at that step", "at_server_cpu", lambda v: _fmt(100 * v, ".0f", " %")),
        ("setup, offer to first echo p50 ms", "setup_echo_p50_ms", lambda v: _fmt(v, ".1f")),
        ("setup, offer to first echo p95 ms", "setup_echo_p95_ms", lambda v: _fmt(v, ".1f")),
    )
    rows = []
    for what, key, fmt in figures:
        cells = []
        for name in names:
            value = s.get(name, {}).get(key)
            cells.append("-" if value is None else fmt(value))
        rows.append([what, *cells])
    table = harness.table("Peers side by side (50 pkt/s each way a call)", ["", *names], rows)
    stops = [f"ramp of {n} stopped: {s[n]['ramp_stopped_by']}" for n in names]
    return "\n".join([table, *stops])


def ratio_table(s: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for other, c in s.get("transceiver_vs", {}).items():
        budget = f">= {c['budget']:g}x"
        rows += [
            [
                other,
                "calls a core by CPU, ours / theirs",
                _fmt(c["calls_a_core_by_cpu"], ".2f", "x"),
                budget,
                c["verdict_by_cpu"],
            ],
            [
                other,
                "calls at < 0.1 % loss measured, ours / theirs",
                _fmt(c["calls_measured"], ".2f", "x"),
                budget,
                c["verdict_measured"],
            ],
            [
                other,
                "CPU a call at each one's largest good step, theirs / ours",
                _fmt(c["cpu_per_call"], ".2f", "x"),
                "",
                "",
            ],
            *(
                [other, f"CPU a call at {calls:,} calls, theirs / ours", f"{r:.2f}x", "", ""]
                for calls, r in sorted(c["cpu_per_call_at_same_calls"].items())
            ),
            [other, "setup p50, theirs / ours", _fmt(c["setup_echo_p50"], ".1f", "x"), "", ""],
        ]
    if not rows:
        return "(no ratios: the transceiver and another peer must both run)"
    return harness.table(
        "Transceiver against each peer (one run)",
        ["peer", "figure", "ratio", "budget", "met"],
        rows,
    )


# Main -----------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows, few steps (~1 minute)")
    p.add_argument("--peers", default=",".join(PEERS), help="any of " + ", ".join(PEERS))
    for name in PEERS:
        p.add_argument(f"--{name}-steps", default=None, help="comma-separated call counts")
    p.add_argument("--window", type=float, default=None, help="measured seconds a step [10]")
    p.add_argument("--warmup", type=float, default=None, help="seconds of audio before it [1]")
    p.add_argument("--setup-calls", type=int, default=None, help="calls a peer timed [20]")
    p.add_argument(
        "--janus-event-loops",
        type=int,
        default=0,
        help="Janus's event_loops (0: its default, a loop thread per call) [0]",
    )
    p.add_argument("--quiet-wait", type=float, default=15.0, help="see peer_aiortc.py [15]")
    p.add_argument("--retries", type=int, default=2, help="see peer_aiortc.py [2]")
    p.add_argument("--inside", type=int, default=None, help=argparse.SUPPRESS)  # owner pid
    args = p.parse_args()
    args.peers = [n for n in args.peers.split(",") if n]
    if set(args.peers) - set(PEERS) or not args.peers:
        p.error(f"--peers takes {', '.join(PEERS)}")
    defaults = QUICK_STEPS if args.quick else STEPS
    args.steps = {name: _steps(getattr(args, f"{name}_steps")) or defaults[name] for name in PEERS}
    args.window = args.window or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.setup_calls = args.setup_calls or (5 if args.quick else 20)
    return args


def _steps(text: str | None) -> tuple[int, ...]:
    return tuple(sorted({int(s) for s in text.split(",")})) if text else ()


@contextlib.contextmanager
def all_peers(args: argparse.Namespace) -> Iterator[tuple[dict[str, Peer], tuple[int, int]]]:
    """The transceiver and aiortc (peer_aiortc.py's), and Janus in its namespace."""
    with contextlib.ExitStack() as stack:
        local = [n for n in args.peers if n != "janus"]
        by_name, cores = stack.enter_context(peers(local))
        if "janus" in args.peers:
            net = JanusNet(args.inside)
            by_name["janus"] = stack.enter_context(
                janus_server(net, cores[1], args.janus_event_loops)
            )
        yield {n: by_name[n] for n in args.peers}, cores


def bench(args: argparse.Namespace, janus: str | None) -> None:
    results, figures, info = measure_peers(args, functools.partial(all_peers, args))
    headline = figures["summary"] = summary(results)
    figures["janus"] = {"version": janus, "event_loops": args.janus_event_loops} if janus else None
    tables = [
        setup_table(results),
        *(step_table(n, r["steps"]) for n, r in results.items()),
        summary_table(headline, list(results)),
        ratio_table(headline),
        load_line(info),
    ]
    harness.report("peer_janus", tables, figures, info)
    for line in figures["warnings"]:
        print(line)


def main() -> None:
    args = parse_args()
    if args.inside is not None:  # the second run, inside the calls' namespace
        bench(args, janus_version())
        return
    if "janus" in args.peers and (why := janus_unavailable()):
        print(f"janus: skipped: {why}", flush=True)
        args.peers.remove("janus")
    if "janus" not in args.peers:
        if args.peers:
            bench(args, None)
        return
    net = JanusNet(os.getpid())
    try:
        net.create()
    except RuntimeError as exc:
        net.destroy()
        print(f"janus: skipped: cannot make its network namespaces ({exc})", flush=True)
        args.peers.remove("janus")
        if args.peers:
            bench(args, None)
        return
    try:
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
        inner = subprocess.run(net.calls_command([*argv, "--inside", str(net.owner)]))
    finally:
        net.destroy()
    sys.exit(inner.returncode)


if __name__ == "__main__":
    main()
