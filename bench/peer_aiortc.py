"""Transceiver vs an aiortc echo server: CPU per call, calls a core at < 0.1 % loss, setup time.

    .venv/bin/python bench/peer_aiortc.py [--quick] [--peers transceiver,aiortc]

The same call load on both peers: bench/loadclient.py's calls (the project's client-role
`Session`, one UDP socket each, one uvloop loop, one 20 ms ticker for all) sending one real
Opus frame (libopus output, so aiortc can decode it) every 20 ms; each peer echoes it.
- `transceiver`: voicerelay's transceiver, echo app. The calls talk to its internal port in
  relay envelopes (transceiver_capacity.py's `direct` path): no relay in the way, as none is in
  aiortc's.
- `aiortc`: bench/aiortc_echo_server.py, its own process: one RTCPeerConnection a call that
  decodes what arrives and encodes it again to send it back (how aiortc echoes).
Each server runs alone on the core under test; this load client on the other. aiortc is a
full ICE agent and checks the client too: the project's controlling `Session` answers those
checks (a full agent itself), so both peers get the same `ClientCall`.

Per peer: (1) setup: calls placed one at a time, peers alternating: offer posted -> answer ->
secure (DTLS up) -> first echoed audio, p50/p99; (2) a ramp: add calls (bounded concurrency),
then per step warm up, measure CPU over a window, stop audio, drain, compare what the clients
sent/got back with the server's own per-call counters (loss each way). A ramp stops at >= 0.1 %
loss, a failed setup, a saturated core or a load client behind its ticker. Calls a core:
MEASURED (largest step under 0.1 % loss with the load fully offered: <= 1 % of the client's
20 ms ticks late) and EXTRAPOLATED (one core / the server's CPU per call at that step). Before
each window a step waits (up to `--quiet-wait` s) for other processes to leave our cores, and a
step that failed while others used them is measured again (`--retries`): the machine may be
shared. Budget (issue 14): transceiver calls a core >= 10x aiortc's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import harness
import numpy as np
import uvloop
from loadclient import (
    RTP_TICKS,
    TICK,
    CoreMeter,
    Counts,
    LoadClient,
    SetupResult,
    bench_stack,
    drain,
    raise_fd_limit,
)
from peer_coturn import RunTimeMeter, wait_quiet

from tests.support.procs import free_ports, wait_for
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.voice.opus import OpusEncoder
from voicerelay.wire.addr import Addr

LOSS_LIMIT = 0.001  # the budget: < 0.1 %
SATURATED = 0.95  # share of its core at which a server counts as saturated
CLIENT_SATURATED = 0.95
MISSED_TICKS_LIMIT = 0.01
CONTENDED = 0.10  # others' share of a core worth a warning
FIRST_ECHO_TIMEOUT = 10.0
BUDGET_RATIO = 10.0
TIMER_SLACK = 0.001  # uvloop's timer resolution
PEERS = ("transceiver", "aiortc")
STEPS = {
    "transceiver": (100, 200, 400, 600, 800, 1000, 1200),
    "aiortc": (5, 10, 20, 30, 40, 60, 80, 100, 150, 200),
}
QUICK_STEPS = {"transceiver": (50, 100, 200), "aiortc": (5, 10, 20)}
CONCURRENCY = {"transceiver": 50, "aiortc": 10}  # calls in setup at once


def opus_frame(target_bytes: int = 60) -> bytes:
    """One real 20 ms Opus frame (a 440 Hz tone) of about `target_bytes`: what every call sends."""
    encoder = OpusEncoder(bitrate=target_bytes * 8 * 50 * 85 // 100, fec=False)
    t = np.arange(960) / 48000
    frame = b""
    for i in range(10):  # let the encoder settle past its first frames
        frame = encoder.encode((8000 * np.sin(2 * np.pi * 440 * (t + i * 0.02))).astype(np.int16))
    return frame


# The load client ----------------------------------------------------------------------------
class PeerLoadClient(LoadClient):
    """bench/loadclient.py's load client, placing calls of `call_class` with a longer setup
    timeout (aiortc is slow to answer under load), their sockets bound to `local_host`."""

    def __init__(
        self,
        *args: Any,
        call_class: type[ClientCall],
        timeout: float,
        local_host: str = "127.0.0.1",
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.call_class = call_class
        self.timeout = timeout
        self.options.local_host = local_host

    def new_call(self) -> ClientCall:
        return self.call_class(self.certificate)

    async def _open_one(self, result: SetupResult, timeout: float) -> None:
        await super()._open_one(result, max(timeout, self.timeout))


# The peers ------------------------------------------------------------------------------------
@dataclass
class Peer:
    """A server under test: where to call it, whose CPU counts, how many calls it holds, and
    how its calls are placed (the call's signaling, the load client, the calls' address)."""

    name: str
    url: str
    pid: int
    call_class: type[ClientCall]
    direct: Addr | None
    sessions: Callable[[], int]
    client_class: Callable[..., PeerLoadClient] = PeerLoadClient
    local_host: str = "127.0.0.1"


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def aiortc_server(core: int) -> Iterator[Peer]:
    """bench/aiortc_echo_server.py on a free port, pinned to `core`."""
    port = free_ports(1)
    cmd = [sys.executable, harness.BENCH / "aiortc_echo_server.py", "--listen", f"127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"aiortc echo server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            return get_json(url + "/v1/stats") is not None
        return False

    with harness.process(cmd, core, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        wait_for(ready, 20, 0.05, "the aiortc echo server")
        harness.pin(proc.pid, core)
        yield Peer(
            "aiortc",
            url,
            proc.pid,
            ClientCall,
            None,
            lambda: get_json(url + "/v1/stats")["sessions"],
        )


@contextlib.contextmanager
def peers(names: list[str]) -> Iterator[tuple[dict[str, Peer], tuple[int, int]]]:
    """Start the peers (transceiver: with a relay beside it, as `relayctl` runs it; only its
    internal port is called); yields them by name and (driver core, core under test)."""
    driver, test = harness.cores()
    with contextlib.ExitStack() as stack:
        out: dict[str, Peer] = {}
        if "transceiver" in names:
            s = stack.enter_context(bench_stack())
            out["transceiver"] = Peer(
                "transceiver",
                s.transceiver.url,
                s.transceiver_pid,
                ClientCall,
                s.transceiver.internal,
                lambda: s.transceiver.stats()["sessions"],
            )
        else:
            raise_fd_limit()
            harness.pin(os.getpid(), driver)
        if "aiortc" in names:
            out["aiortc"] = stack.enter_context(aiortc_server(test))
        yield {n: out[n] for n in names}, (driver, test)


async def wait_calls(peer: Peer, at_most: int, timeout: float = 20.0) -> int:
    """Wait until the peer holds at most `at_most` calls; returns how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        held = await asyncio.to_thread(peer.sessions)
        if held <= at_most or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


# Setup time -----------------------------------------------------------------------------------
@dataclass
class SetupTimes:
    """Milliseconds from the offer being posted, per call."""

    answered: list[float] = field(default_factory=list)
    secure: list[float] = field(default_factory=list)
    first_echo: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def timed_call(
    peer: Peer, http: aiohttp.ClientSession, certificate: Certificate, frame: bytes
) -> tuple[float, float, float]:
    """One call: (answered, secure, first echo) ms after the offer; audio from DTLS up."""
    call = peer.call_class(certificate)
    try:
        options = CallOptions(direct=peer.direct, keep_packets=False, local_host=peer.local_host)
        await asyncio.wait_for(call.connect(http, peer.url, options), FIRST_ECHO_TIMEOUT)
        await asyncio.wait_for(call.secure, FIRST_ECHO_TIMEOUT)
        deadline, timestamp = time.monotonic() + FIRST_ECHO_TIMEOUT, 0
        while call.first_rtp_at is None:  # one frame now, then one every 20 ms, until an echo
            if time.monotonic() > deadline:
                raise TimeoutError(f"no echo within {FIRST_ECHO_TIMEOUT:g} s of DTLS")
            timestamp += RTP_TICKS
            call.send_audio(frame, timestamp)
            await asyncio.sleep(TICK)
        assert call.answered_at and call.secure_at
        return tuple(  # type: ignore[return-value]
            (at - call.posted_at) * 1000
            for at in (call.answered_at, call.secure_at, call.first_rtp_at)
        )
    finally:
        call.close()


async def measure_setup(
    peers_by_name: dict[str, Peer], http: aiohttp.ClientSession, calls: int, frame: bytes
) -> dict[str, SetupTimes]:
    """`calls` calls a peer, one at a time, peers alternating (one warm-up call each first)."""
    certificate = Certificate.generate()
    times = {name: SetupTimes() for name in peers_by_name}
    for round_ in range(calls + 1):
        for name, peer in peers_by_name.items():
            try:
                answered, secure, echo = await timed_call(peer, http, certificate, frame)
            except Exception as exc:  # noqa: BLE001 - a failed call is a figure too
                times[name].failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if round_:  # round 0 warms up: imports, TCP connect, caches
                times[name].answered.append(answered)
                times[name].secure.append(secure)
                times[name].first_echo.append(echo)
    for peer in peers_by_name.values():
        await wait_calls(peer, 0)
    return times


# Ramp -----------------------------------------------------------------------------------------
@dataclass
class Step:
    """One ramp step (CPU as shares of one core)."""

    calls: int
    pps_up: float
    pps_down: float
    loss_up: float
    loss_down: float
    server_cpu: float
    server_cpu_per_call: float
    server_us_per_echo: float
    server_ms_per_setup: float
    client_cpu: float
    others_test_core: float
    others_driver_core: float
    missed_ticks: float
    setup_failures: int
    setup_errors: list[str]
    packets_counted: int
    waited_for_quiet_s: float

    @property
    def ok(self) -> bool:
        """Under the loss limit both ways, every call set up, and the load really offered (the
        load client kept its 20 ms ticker: a starved client sends less and flatters CPU a call)."""
        return (
            self.loss_up < LOSS_LIMIT
            and self.loss_down < LOSS_LIMIT
            and not self.setup_failures
            and self.missed_ticks <= MISSED_TICKS_LIMIT
        )


async def run_step(
    peer: Peer, client: PeerLoadClient, target: int, cores: tuple[int, int], args
) -> Step:
    """Grow to `target` calls, then measure one window of 50 packets/s each way a call."""
    setup_cpu = RunTimeMeter([peer.pid]).start()  # ns resolution: a few calls' setups
    setup = await client.open_calls(target - len(client.calls), CONCURRENCY.get(peer.name, 50))
    setup_cpu.stop()
    before = await client.server_counts()  # quiescent: no audio between steps
    waited = await asyncio.to_thread(wait_quiet, cores, [peer.pid, os.getpid()], args.quiet_wait)
    client.start_ticker()
    await asyncio.sleep(args.warmup)
    ticks0, missed0 = client.ticks, client.missed_ticks
    window0 = client.client_counts()
    server, me = harness.CpuMeter([peer.pid]).start(), harness.CpuMeter([os.getpid()]).start()
    driver_core, test_core = CoreMeter(cores[0]).start(), CoreMeter(cores[1]).start()
    await asyncio.sleep(args.window)
    for meter in (server, me, driver_core, test_core):
        meter.stop()
    window = client.client_counts() - window0
    ticks, missed = client.ticks - ticks0, client.missed_ticks - missed0
    client.stop_ticker()
    await drain(1.0)
    step: Counts = (await client.server_counts()) - before
    calls = len(client.calls)
    return Step(
        calls=calls,
        pps_up=window.sent / server.wall,
        pps_down=window.echoed / server.wall,
        loss_up=step.loss_up,
        loss_down=step.loss_down,
        server_cpu=server.utilisation,
        server_cpu_per_call=server.utilisation / calls if calls else float("nan"),
        server_us_per_echo=1e6 * server.cpu / max(1, window.echoed),
        server_ms_per_setup=1000 * setup_cpu.cpu / setup.opened if setup.opened else float("nan"),
        client_cpu=me.utilisation,
        others_test_core=max(0.0, test_core.busy - server.utilisation),
        others_driver_core=max(0.0, driver_core.busy - me.utilisation),
        missed_ticks=missed / max(1, ticks + missed),
        setup_failures=setup.failed,
        setup_errors=setup.errors[:3],
        packets_counted=step.sent,
        waited_for_quiet_s=waited,
    )


def limit_reached(step: Step, target: int) -> str | None:
    """Why a ramp must stop after this step (None: go on)."""
    if step.setup_failures:
        return (
            f"setup failed for {step.setup_failures} calls on the way to {target} "
            f"({step.setup_errors[0] if step.setup_errors else '?'})"
        )
    if step.missed_ticks > MISSED_TICKS_LIMIT:
        return f"load client fell behind its 20 ms ticker ({step.missed_ticks:.1%} ticks late)"
    if not step.ok:
        return (
            f"loss >= {LOSS_LIMIT:.1%} at {step.calls} calls "
            f"(up {step.loss_up:.2%}, down {step.loss_down:.2%})"
        )
    if step.server_cpu >= SATURATED:
        return f"server saturated ({step.server_cpu:.0%} of its core)"
    if step.client_cpu >= CLIENT_SATURATED:
        return f"load client saturated ({step.client_cpu:.0%} of its core)"
    return None


def contended_failure(step: Step, target: int) -> bool:
    """True if the step failed while other processes used one of our cores and neither the
    server nor the load client was saturated by itself: worth measuring again."""
    if limit_reached(step, target) is None or step.setup_failures:
        return False
    if step.server_cpu >= SATURATED or step.client_cpu >= CLIENT_SATURATED:
        return False
    return max(step.others_test_core, step.others_driver_core) >= CONTENDED


async def ramp(
    peer: Peer, http: aiohttp.ClientSession, frame: bytes, cores: tuple[int, int], args
) -> tuple[list[Step], list[Step], str]:
    """The peer's steps until loss or saturation: returns the steps, the steps measured again
    because other processes used one of our cores, and why the ramp stopped."""
    client = peer.client_class(
        http,
        peer.url,
        direct=peer.direct,
        call_class=peer.call_class,
        timeout=20.0,
        local_host=peer.local_host,
    )
    client.payload = frame
    steps: list[Step] = []
    contended: list[Step] = []
    stopped = f"reached the last step ({args.steps[peer.name][-1]}) without loss or saturation"
    try:
        for target in args.steps[peer.name]:
            step = await run_step(peer, client, target, cores, args)
            for _ in range(args.retries):  # others took a core: measure the same calls again
                if not contended_failure(step, target):
                    break
                print(progress_line(peer.name, step) + ": contended, measured again", flush=True)
                contended.append(step)
                step = await run_step(peer, client, target, cores, args)
            steps.append(step)
            print(progress_line(peer.name, step), flush=True)
            reason = limit_reached(step, target)
            if reason is not None:
                stopped = reason
                break
    finally:
        client.close_all()
        await wait_calls(peer, 0)
    return steps, contended, stopped


def progress_line(name: str, s: Step) -> str:
    return (
        f"  {name:>11} {s.calls:5d} calls: loss up {s.loss_up:.3%} down {s.loss_down:.3%}, "
        f"server {s.server_cpu:.0%} ({100 * s.server_cpu_per_call:.3f}% a call), load client "
        f"{s.client_cpu:.0%}, late ticks {s.missed_ticks:.1%}, others on the server's core "
        f"{s.others_test_core:.0%}"
    )


def capacity(steps: list[Step]) -> dict[str, Any]:
    """MEASURED calls (largest good step: under the loss limit, load fully offered) and
    EXTRAPOLATED calls a core (one core / the server's CPU a call at that step)."""
    good = [s for s in steps if s.ok]
    if not good:
        return {"measured_calls": 0}
    best = max(good, key=lambda s: s.calls)
    return {
        "measured_calls": best.calls,
        "at_server_cpu": best.server_cpu,
        "server_cpu_per_call": best.server_cpu_per_call,
        "extrapolated_calls_per_core": 1 / best.server_cpu_per_call,
        "server_us_per_echo": best.server_us_per_echo,
    }


# Output ---------------------------------------------------------------------------------------
def setup_table(times: dict[str, SetupTimes]) -> str:
    headers = ["peer", "calls", "failed", "answer p50", "secure p50", "echo p50", "echo p99"]
    rows = [
        [
            name,
            len(t.first_echo),
            len(t.failures),
            harness.percentile(t.answered, 50),
            harness.percentile(t.secure, 50),
            harness.percentile(t.first_echo, 50),
            harness.percentile(t.first_echo, 99),
        ]
        for name, t in times.items()
    ]
    title = "Setup: offer posted -> milestone, ms (calls one at a time, peers alternating)"
    return harness.table(title, headers, rows)


def step_table(name: str, steps: list[Step]) -> str:
    headers = [
        "calls",
        "pkt/s up",
        "pkt/s down",
        "loss up %",
        "loss down %",
        "server CPU %",
        "% a call",
        "us/echo",
        "ms/setup",
        "client CPU %",
        "late ticks %",
        "others srv core %",
    ]
    rows = [
        [
            s.calls,
            s.pps_up,
            s.pps_down,
            100 * s.loss_up,
            100 * s.loss_down,
            100 * s.server_cpu,
            100 * s.server_cpu_per_call,
            s.server_us_per_echo,
            s.server_ms_per_setup,
            100 * s.client_cpu,
            100 * s.missed_ticks,
            100 * s.others_test_core,
        ]
        for s in steps
    ]
    title = f"Ramp, {name}: 50 pkt/s each way a call (CPU in % of one core; echo = 1 in + 1 out)"
    return harness.table(title, headers, rows)


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline figures and the transceiver/aiortc ratios."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        cap, times = r["capacity"], r["setup"]
        out[name] = {
            **cap,
            "ramp_stopped_by": r["stopped"],
            "setup_echo_p50_ms": harness.percentile(times.first_echo, 50),
            "setup_echo_p99_ms": harness.percentile(times.first_echo, 99),
        }
    if {"transceiver", "aiortc"} <= results.keys():
        ours, theirs = out["transceiver"], out["aiortc"]
        if theirs.get("measured_calls"):
            out["measured_ratio"] = ours["measured_calls"] / theirs["measured_calls"]
        if theirs.get("extrapolated_calls_per_core") and ours.get("extrapolated_calls_per_core"):
            out["extrapolated_ratio"] = (
                ours["extrapolated_calls_per_core"] / theirs["extrapolated_calls_per_core"]
            )
            out["cpu_per_call_ratio"] = theirs["server_cpu_per_call"] / ours["server_cpu_per_call"]
        out["budget_ratio"] = BUDGET_RATIO
    return out


def summary_table(s: dict[str, Any]) -> str:
    rows = []
    for name in PEERS:
        if name not in s:
            continue
        p = s[name]
        measured = (
            f"{p['measured_calls']} (server at {p['at_server_cpu']:.0%} of its core)"
            if p.get("measured_calls")
            else "none: the first step already failed"
        )
        rows.append([name, "MEASURED calls at < 0.1% loss (largest good step)", measured])
        if "extrapolated_calls_per_core" in p:
            rows.append(
                [
                    name,
                    "EXTRAPOLATED calls a core (1 core / CPU per call)",
                    f"{p['extrapolated_calls_per_core']:.0f} "
                    f"({100 * p['server_cpu_per_call']:.3f}% of a core a call, "
                    f"{p['server_us_per_echo']:.1f} us an echo)",
                ]
            )
        rows.append(
            [
                name,
                "setup: offer to first echoed audio p50 / p99",
                f"{p['setup_echo_p50_ms']:.1f} / {p['setup_echo_p99_ms']:.1f} ms",
            ]
        )
        rows.append([name, "ramp stopped by", p["ramp_stopped_by"]])
    for key, what in (
        ("measured_ratio", "transceiver / aiortc calls a core, MEASURED"),
        ("extrapolated_ratio", "transceiver / aiortc calls a core, EXTRAPOLATED"),
        ("cpu_per_call_ratio", "aiortc CPU per call / transceiver's"),
    ):
        if key in s:
            rows.append(["", what, f"{s[key]:.1f}x (budget >= {BUDGET_RATIO:g}x)"])
    return harness.table("Transceiver vs aiortc", ["peer", "figure", "value"], rows)


def warnings(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, r in results.items():
        for s in r["steps"]:
            if s.others_test_core > CONTENDED or s.others_driver_core > CONTENDED:
                lines.append(
                    f"warning [{name}] {s.calls} calls: other processes used "
                    f"{s.others_test_core:.0%} of the server's core and "
                    f"{s.others_driver_core:.0%} of the load client's"
                )
    return lines


# Main -----------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows, few steps")
    p.add_argument("--peers", default=",".join(PEERS), help="transceiver, aiortc or both")
    p.add_argument("--transceiver-steps", default=None, help="comma-separated call counts")
    p.add_argument("--aiortc-steps", default=None, help="comma-separated call counts")
    p.add_argument("--window", type=float, default=None, help="measured seconds a step [10]")
    p.add_argument("--warmup", type=float, default=None, help="seconds of audio before it [1]")
    p.add_argument("--setup-calls", type=int, default=None, help="calls a peer timed [20]")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="seconds a step may wait for other processes to leave our cores [15]",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a failing step again while others used >10%% of one of our cores",
    )
    args = p.parse_args()
    args.peers = [n for n in args.peers.split(",") if n]
    if set(args.peers) - set(PEERS) or not args.peers:
        p.error(f"--peers takes {', '.join(PEERS)}")
    defaults = QUICK_STEPS if args.quick else STEPS
    args.steps = {
        "transceiver": _steps(args.transceiver_steps) or defaults["transceiver"],
        "aiortc": _steps(args.aiortc_steps) or defaults["aiortc"],
    }
    args.window = args.window or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.setup_calls = args.setup_calls or (5 if args.quick else 20)
    return args


def _steps(text: str | None) -> tuple[int, ...]:
    return tuple(sorted({int(s) for s in text.split(",")})) if text else ()


async def run(
    by_name: dict[str, Peer], cores: tuple[int, int], args: argparse.Namespace, frame: bytes
) -> dict[str, dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as http:
        print(f"setup: {args.setup_calls} calls a peer, one at a time", flush=True)
        times = await measure_setup(by_name, http, args.setup_calls, frame)
        results = {}
        for name, peer in by_name.items():
            print(f"[{name}] ramp {list(args.steps[name])}, {args.window:g} s windows", flush=True)
            steps, contended, stopped = await ramp(peer, http, frame, cores, args)
            results[name] = {
                "setup": times[name],
                "steps": steps,
                "contended": contended,
                "stopped": stopped,
                "capacity": capacity(steps),
            }
        return results


def measure_peers(
    args: argparse.Namespace, peers_at: Callable[[], Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run the load against the peers `peers_at()` yields ((by name, cores) in a context):
    (results, the JSON figures every peer benchmark writes, machine info)."""
    info = harness.machine()
    started = time.monotonic()
    frame = opus_frame()
    with peers_at() as (by_name, cores):
        print(
            f"servers on core {cores[1]}; load client on core {cores[0]}; Opus frame "
            f"{len(frame)} B, 50 packets/s each way a call",
            flush=True,
        )
        results = uvloop.run(run(by_name, cores, args, frame))
    info["loadavg_at_end"] = os.getloadavg()[0]
    figures = {
        "quick": args.quick,
        "window_s": args.window,
        "opus_frame_bytes": len(frame),
        "packets_per_s_each_way_per_call": 50,
        "peers": {
            name: {
                "setup": asdict(r["setup"]),
                "steps": [asdict(s) for s in r["steps"]],
                "contended_steps_measured_again": [asdict(s) for s in r["contended"]],
                "stopped": r["stopped"],
                "capacity": r["capacity"],
            }
            for name, r in results.items()
        },
        "warnings": warnings(results),
        "seconds": time.monotonic() - started,
    }
    return results, figures, info


def load_line(info: dict[str, Any]) -> str:
    return (
        f"load average at start {info['loadavg_at_start']:.2f}, at end "
        f"{info['loadavg_at_end']:.2f} (2 cores: others' load moves the figures)"
    )


def main() -> None:
    args = parse_args()
    results, figures, info = measure_peers(args, lambda: peers(args.peers))
    headline = figures["summary"] = summary(results)
    tables = [
        setup_table({n: r["setup"] for n, r in results.items()}),
        *(step_table(n, r["steps"]) for n, r in results.items()),
        summary_table(headline),
        load_line(info),
    ]
    harness.report("peer_aiortc", tables, figures, info)
    for line in figures["warnings"]:
        print(line)


if __name__ == "__main__":
    main()
