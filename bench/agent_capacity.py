"""Decoded-audio (agent) calls per core: many calls talking in turns to one transceiver process
bridged to a Realtime backend.

Budget (DESIGN.md): >= 200 decoded-audio calls a core (decode, VAD, resample, encode, bridge
framing; backend excluded) at < 0.1 % late frames. Anchors: LiveKit Agents users report 4-5
rooms per CPU; Pipecat about 20 % of a core per call.

- The transceiver (`relayctl transceiver --agent-url ws://.../v1/realtime`) runs alone on the core
  under test; bench/echo_backend.py (its own process: at each commit + response.create it streams
  the committed audio back as the reply) and this load client share the other core.
- The load client is bench/loadclient.py's: the project's client-role Session, one UDP socket
  per call, envelopes straight to the transceiver (no relay), one 20 ms ticker for all calls in
  10 phases. Each call talks in turns from pre-encoded Opus packets (no encoding per call): an
  espeak-ng sentence, then listening with faint noise (-61 dBFS) for as long as the echoed reply
  takes to play, each call at its own offset in that cycle. So the transceiver decodes, runs
  the jitter buffer and VAD (resampling where the agent's rate is not one Opus runs at),
  frames 100 ms appends, commits, parses the reply's deltas, paces, encodes and protects, for
  every call.
- Per step: add calls, wait until each call's bridge connected, talk for a warm-up and a measured
  window, stop, let the replies play out, then compare what the clients sent and got with each
  session's own counters (GET /v1/sessions/{id}). Late frames: the pacer's late slots (a frame
  sent a whole frame late) and the jitter buffer's concealed or FEC-recovered frames (a packet
  not there in time), over all frames in and out. The ramp stops at >= 0.1 % late frames, any
  loss, or a saturated core. MEASURED is the largest step with < 0.1 % late and 0 loss;
  EXTRAPOLATED is one core divided by the transceiver's CPU per call there.
- `--profile N` runs N calls with the transceiver under cProfile (CPU-time clock, the measured
  window only) instead, and prints its top costs by function and by source file.
- `--nice -10` (root) raises the priority of the processes under test on a machine others share;
  the "others" column says how much of the transceiver's core other processes took anyway;
  `--keep-going` ramps on past late frames (only saturation or failures stop it), to see CPU
  per call at every count when others' load makes frames late.

Run: .venv/bin/python bench/agent_capacity.py [--quick] [--steps 10,20,...] [--profile N]
     [--nice N] [--keep-going]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import harness
import numpy as np
import psutil
import uvloop
from loadclient import RTP_TICKS, CoreMeter, LoadClient, raise_fd_limit

from tests.support.procs import RELAYCTL, free_ports, wait_for
from tests.support.voice import speech
from voicerelay.transceiver.client import ClientCall
from voicerelay.voice.opus import OpusEncoder
from voicerelay.wire.addr import Addr
from voicerelay.wire.token import write_new_secret

# The transceiver under cProfile (CPU-time clock, so idle waits are not charged to whatever
# frame was current): profiling on at SIGUSR1, off and written to argv[1] at SIGUSR2.
PROFILED_MAIN = """
import cProfile, runpy, signal, sys, time
out = sys.argv.pop(1)
profiler = cProfile.Profile(time.process_time)
def on(*_): profiler.enable()
def off(*_): profiler.disable(); profiler.dump_stats(out)
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
sys.argv[0] = "relayctl"
runpy.run_module("voicerelay.cli.main", run_name="__main__")
"""
LATE_LIMIT = 0.001  # the budget: < 0.1 % late frames
SATURATED = 0.95  # share of a core
CONTENDED = 0.10  # others' share of the transceiver's core worth a warning
MISSED_TICKS_LIMIT = 0.01  # the load client could not keep its 20 ms ticker
BUDGET_CALLS = 200
PHRASE = "what is the weather today"  # about 1.5 s of speech
LISTEN_EXTRA_S = 1.0  # listening = speech + this: the echoed reply (pre-roll + speech + hangover)
NOISE_RMS = 30.0  # int16 units: -61 dBFS of faint noise while listening
RATE = 48000
FRAME = 960
DEFAULT_STEPS = (10, 20, 40, 60, 80, 100, 125, 150, 200, 250, 300)
QUICK_STEPS = (10, 25, 50, 100)
JITTER_BUCKETS_MS = 200  # client-side reply jitter histogram: 1 ms buckets


# The stack under test --------------------------------------------------------------------------
@dataclass
class Stack:
    """A transceiver bridged to the echo backend; transceiver on `test_core`, the rest on
    `driver_core`."""

    transceiver: subprocess.Popen
    backend: subprocess.Popen
    url: str  # the transceiver's signaling
    internal: Addr  # its UDP endpoint (the load client speaks envelopes to it)
    backend_http: str
    driver_core: int
    test_core: int
    log: Path
    profile: Path | None = None  # the transceiver runs under PROFILED_MAIN, writing here

    def stats(self) -> dict[str, Any]:
        return http_json(self.url + "/v1/stats")

    def backend_stats(self) -> dict[str, Any]:
        return http_json(self.backend_http + "/v1/stats")


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(ready, 20, 0.05, url)


def set_nice(pids: list[int], nice: int) -> None:
    """Give the processes under test scheduling priority `nice` (negative: before others on a
    shared machine; needs root)."""
    try:
        for pid in pids:
            psutil.Process(pid).nice(nice)
    except psutil.AccessDenied:
        raise SystemExit(f"agent_capacity: --nice {nice} needs root") from None


@contextlib.contextmanager
def agent_stack(profile: Path | None = None, nice: int = 0) -> Iterator[Stack]:
    """Echo backend (driver core) and transceiver (core under test; under PROFILED_MAIN writing
    to `profile` if given), both at niceness `nice` with this process; stopped after."""
    driver, test = harness.cores()
    raise_fd_limit()
    harness.pin(os.getpid(), driver)
    with tempfile.TemporaryDirectory(prefix="vr-agent-bench-") as tmp:
        state = Path(tmp)
        secret = state / "secret.key"
        write_new_secret(secret)
        backend_port = free_ports(1, socket.SOCK_STREAM)
        http_port = free_ports(1, socket.SOCK_STREAM)
        internal = ("127.0.0.1", free_ports(1))
        backend_http = f"http://127.0.0.1:{backend_port}"
        log = state / "transceiver.log"
        backend_cmd = [sys.executable, harness.BENCH / "echo_backend.py"]
        backend_cmd += ["--listen", f"127.0.0.1:{backend_port}"]
        trx_cmd = [
            "transceiver",
            "--internal",
            f"127.0.0.1:{internal[1]}",
            "--http",
            f"127.0.0.1:{http_port}",
            "--relay-public",
            "127.0.0.1:3478",
            "--secret-file",
            secret,
            "--state-dir",
            state,
            "--agent-url",
            f"ws://127.0.0.1:{backend_port}/v1/realtime",
            "--session-rate",
            "0",  # a load client places calls faster than people
        ]
        if profile is None:
            trx_cmd = [*RELAYCTL, *trx_cmd]
        else:
            trx_cmd = [sys.executable, "-c", PROFILED_MAIN, profile, *trx_cmd]
        with (
            open(log, "wb") as logf,
            harness.process(backend_cmd, driver, stderr=logf) as backend,
            harness.process(trx_cmd, test, stdout=logf, stderr=subprocess.STDOUT) as trx,
        ):
            wait_healthy(backend_http, backend, log)
            url = f"http://127.0.0.1:{http_port}"
            wait_healthy(url, trx, log)
            harness.pin(trx.pid, test)  # threads it started since
            if nice:
                set_nice([trx.pid, backend.pid, os.getpid()], nice)
            yield Stack(trx, backend, url, internal, backend_http, driver, test, log, profile)


# The load --------------------------------------------------------------------------------------
def talk_cycle(phrase: str = PHRASE, seed: int = 5) -> tuple[list[bytes], int]:
    """One turn of a call as pre-encoded Opus payloads: the sentence, then faint noise while
    the reply plays. Returns (payloads, frames of speech)."""
    said = speech(phrase)
    speech_frames = -(-said.size // FRAME)
    listen_frames = round((said.size / RATE + LISTEN_EXTRA_S) / 0.02)
    noise = np.random.default_rng(seed).normal(0, NOISE_RMS, listen_frames * FRAME)
    pcm = np.zeros((speech_frames + listen_frames) * FRAME, np.int16)
    pcm[: said.size] = said
    pcm[speech_frames * FRAME :] = noise.astype(np.int16)
    encoder = OpusEncoder(RATE)  # a browser's settings: 32 kbit/s, FEC on
    return [encoder.encode(pcm[i : i + FRAME]) for i in range(0, pcm.size, FRAME)], speech_frames


class TalkingCall(ClientCall):
    """A load call that sends its turn cycle from its own offset, and measures how late each
    reply packet arrives against its RTP timestamp (1 ms histogram, relative to the earliest
    packet of its talkspurt)."""

    def __init__(self, *args: Any, offset: int, histogram: np.ndarray, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offset = offset
        self.histogram = histogram
        self._spurt: tuple[int, float] | None = None  # (RTP timestamp, arrival) of its start
        self._earliest = 0.0

    def _on_rtp(self, packet: bytes, now: float) -> None:
        super()._on_rtp(packet, now)
        timestamp = int.from_bytes(packet[4:8], "big")
        if packet[1] & 0x80 or self._spurt is None:  # marker: a reply starts
            self._spurt, self._earliest = (timestamp, now), 0.0
            return
        ts0, at0 = self._spurt
        lag = (now - at0) - ((timestamp - ts0) % 2**32) / RATE
        self._earliest = min(self._earliest, lag)
        late_ms = int(1000 * (lag - self._earliest))
        self.histogram[min(late_ms, JITTER_BUCKETS_MS - 1)] += 1


class TalkingLoad(LoadClient):
    """`LoadClient` whose calls talk in turns (`cycle` of payloads, a random offset each)."""

    def __init__(self, *args: Any, cycle: list[bytes], seed: int = 11, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = cycle
        self.frame = 0
        self.histogram = np.zeros(JITTER_BUCKETS_MS, np.int64)
        self._rng = random.Random(seed)

    def new_call(self) -> TalkingCall:
        return TalkingCall(
            self.certificate, offset=self._rng.randrange(len(self.cycle)), histogram=self.histogram
        )

    def _send_phase(self) -> None:
        if self._phase == 0:
            self._timestamp = (self._timestamp + RTP_TICKS) & 0xFFFFFFFF
            self.frame += 1
        cycle, size, frame, timestamp = self.cycle, len(self.cycle), self.frame, self._timestamp
        for call in self.live[self._phase :: self.phases]:
            call.send_audio(cycle[(frame + call.offset) % size], timestamp)  # type: ignore[attr-defined]


# Counting -------------------------------------------------------------------------------------
SESSION_KEYS = ("rtp_in", "rtp_out")
AUDIO_KEYS = (
    "concealed",
    "recovered",
    "decode_errors",
    "jitter_received",
    "jitter_late",
    "jitter_lost",
    "pacer_frames_sent",
    "pacer_late_slots",
    "pacer_underruns",
    "pacer_dropped_frames",
    "vad_turns",
)


async def session_totals(http: aiohttp.ClientSession, calls: list[ClientCall]) -> Counter[str]:
    """Every call's transceiver-side counters, summed (one GET per call)."""
    gate = asyncio.Semaphore(50)
    totals: Counter[str] = Counter()

    async def one(call: ClientCall) -> None:
        assert call.location is not None
        async with gate, http.get(call.location) as resp:
            if resp.status != 200:
                totals["stats_missing"] += 1
                return
            stats = await resp.json()
        for key in SESSION_KEYS:
            totals[key] += stats.get(key, 0)
        for key in AUDIO_KEYS:
            totals[key] += stats.get("audio", {}).get(key, 0)

    await asyncio.gather(*(one(c) for c in calls))
    totals["client_sent"] = sum(c.rtp_sent for c in calls)
    totals["client_received"] = sum(c.rtp_received for c in calls)
    return totals


def counter_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys)}


def jitter_p99_ms(histogram: np.ndarray) -> float:
    """The 99th percentile of the client-side reply jitter histogram (ms, 1 ms buckets)."""
    total = int(histogram.sum())
    if not total:
        return float("nan")
    return float(np.searchsorted(np.cumsum(histogram), 0.99 * total))


class StepMeters:
    """CPU of the transceiver, the backend and this load client; a profiled transceiver profiles
    exactly this interval."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.transceiver = harness.CpuMeter([stack.transceiver.pid])
        self.backend = harness.CpuMeter([stack.backend.pid])
        self.client = harness.CpuMeter([os.getpid()])
        self._all = (self.transceiver, self.backend, self.client)

    def start(self) -> StepMeters:
        if self.stack.profile is not None:
            os.kill(self.stack.transceiver.pid, signal.SIGUSR1)
        for meter in self._all:
            meter.start()
        return self

    def stop(self) -> StepMeters:
        for meter in self._all:
            meter.stop()
        if self.stack.profile is not None:
            os.kill(self.stack.transceiver.pid, signal.SIGUSR2)
        return self


# A step ----------------------------------------------------------------------------------------
@dataclass
class Step:
    """One ramp step (CPU as shares of one core; late and loss as fractions)."""

    calls: int
    trx_cpu: float
    trx_cpu_per_call: float
    trx_us_per_frame: float  # transceiver CPU per 20 ms frame handled (in + out)
    backend_cpu: float
    client_cpu: float
    others_test_core: float  # processes not ours on the transceiver's core, whole step (~0)
    frames_in: int
    frames_out: int
    out_share: float  # frames out per frame in: how much of the time replies play
    late_out: int  # pacer late slots
    late_in: int  # concealed + FEC-recovered frames
    late: float  # (late_out + late_in) / (frames in + out)
    loss_up: float
    loss_down: float
    reply_jitter_p99_ms: float  # client side, the load client's own delays included
    turns: int
    responses: int
    interruptions: int
    failures: int  # bridge failures of any reason
    setup_failures: int
    sessions_gone: int  # calls whose session the transceiver no longer knew at the end
    missed_ticks: float

    @property
    def ok(self) -> bool:
        return (
            self.late < LATE_LIMIT
            and self.loss_up == 0
            and self.loss_down == 0
            and not self.failures
            and not self.setup_failures
            and not self.sessions_gone
        )


async def wait_bridges(stack: Stack, calls: int, timeout: float = 20.0) -> None:
    """Until the transceiver's bridge opened (or failed) a backend connection per call."""
    deadline = time.monotonic() + timeout
    while True:
        agent = (await asyncio.to_thread(stack.stats))["agent"]
        done = agent.get("connections", 0) + sum(
            v for k, v in agent.items() if k.startswith("failures_connect")
        )
        if done >= calls or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.1)


async def play_out(client: TalkingLoad, timeout: float = 8.0) -> None:
    """Until no reply packet arrived for 0.5 s (replies in flight play to their end)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        received = client.client_counts().echoed
        if received != last:
            last, since = received, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return
        await asyncio.sleep(0.05)


async def run_step(
    stack: Stack, client: TalkingLoad, target: int, args: argparse.Namespace
) -> Step:
    """Grow to `target` calls, talk for a warm-up and a measured window, let the replies play
    out, and count the whole step."""
    setup = await client.open_calls(target - len(client.calls), args.concurrency)
    await wait_bridges(stack, len(client.calls))
    agent_before = (await asyncio.to_thread(stack.stats))["agent"]
    before = await session_totals(client.http, client.calls)  # quiescent: nobody talks
    histogram_before = client.histogram.copy()
    step_trx = harness.CpuMeter([stack.transceiver.pid]).start()  # late frames count over the
    step_core = CoreMeter(stack.test_core).start()  # whole step: so do others on its core
    client.start_ticker()
    await asyncio.sleep(args.warmup)
    ticks0, missed0 = client.ticks, client.missed_ticks
    window0 = client.client_counts()
    meters = StepMeters(stack).start()
    await asyncio.sleep(args.window)
    meters.stop()
    window = client.client_counts() - window0
    ticks, missed = client.ticks - ticks0, client.missed_ticks - missed0
    client.stop_ticker()
    await play_out(client)
    step_trx.stop()
    step_core.stop()
    totals = counter_diff(await session_totals(client.http, client.calls), before)
    agent = counter_diff((await asyncio.to_thread(stack.stats))["agent"], agent_before)
    return step_figures(
        calls=len(client.calls),
        setup_failures=setup.failed,
        meters=meters,
        window_frames=window.sent + window.echoed,
        totals=totals,
        agent=agent,
        jitter_p99=jitter_p99_ms(client.histogram - histogram_before),
        missed_ticks=missed / max(1, ticks + missed),
        others=max(0.0, step_core.busy - step_trx.utilisation),
    )


def step_figures(
    *,
    calls: int,
    setup_failures: int,
    meters: StepMeters,
    window_frames: int,
    totals: dict[str, int],
    agent: dict[str, int],
    jitter_p99: float,
    missed_ticks: float,
    others: float,
) -> Step:
    """A step's figures: CPU from the window, frames, lateness and loss from the whole step."""
    trx = meters.transceiver
    frames_in, frames_out = totals["jitter_received"], totals["pacer_frames_sent"]
    late_out = totals["pacer_late_slots"]
    late_in = totals["concealed"] + totals["recovered"]
    return Step(
        calls=calls,
        trx_cpu=trx.utilisation,
        trx_cpu_per_call=trx.utilisation / calls,
        trx_us_per_frame=1e6 * trx.cpu / max(1, window_frames),
        backend_cpu=meters.backend.utilisation,
        client_cpu=meters.client.utilisation,
        others_test_core=others,
        frames_in=frames_in,
        frames_out=frames_out,
        out_share=frames_out / max(1, frames_in),
        late_out=late_out,
        late_in=late_in,
        late=(late_out + late_in) / max(1, frames_in + frames_out),
        loss_up=loss(totals["client_sent"], totals["rtp_in"]),
        loss_down=loss(totals["rtp_out"], totals["client_received"]),
        reply_jitter_p99_ms=jitter_p99,
        turns=agent.get("turns", 0),
        responses=agent.get("responses", 0),
        interruptions=agent.get("interruptions", 0),
        failures=sum(v for k, v in agent.items() if k.startswith("failures_")),
        setup_failures=setup_failures,
        sessions_gone=totals.get("stats_missing", 0),
        missed_ticks=missed_ticks,
    )


def loss(sent: int, arrived: int) -> float:
    return max(0.0, (sent - arrived) / sent) if sent else float("nan")


# Ramp ------------------------------------------------------------------------------------------
def limit_reached(step: Step, keep_going: bool = False) -> str | None:
    """Why the ramp must stop after this step (None: go on). With `keep_going`, late frames
    and loss do not stop it (CPU per call at every count, on a machine others share)."""
    if step.setup_failures:
        return f"call setup failed for {step.setup_failures} calls"
    if step.failures:
        return f"the bridge failed {step.failures} times (the transceiver's log follows)"
    if step.sessions_gone:
        return f"{step.sessions_gone} sessions ended during the step"
    if not step.ok and not keep_going:
        return (
            f"{step.late:.3%} late frames (pacer late slots {step.late_out}, concealed or "
            f"recovered {step.late_in}), loss up {step.loss_up:.3%} down {step.loss_down:.3%} "
            f"at {step.calls} calls"
        )
    if step.trx_cpu >= SATURATED:
        return f"transceiver saturated ({step.trx_cpu:.0%} of its core)"
    if step.missed_ticks > MISSED_TICKS_LIMIT:
        return f"the load client fell behind its 20 ms ticker ({step.missed_ticks:.1%} late)"
    if step.client_cpu + step.backend_cpu >= SATURATED:
        return (
            f"driver core saturated (load client {step.client_cpu:.0%} + echo backend "
            f"{step.backend_cpu:.0%})"
        )
    return None


async def ramp(stack: Stack, args: argparse.Namespace) -> tuple[list[Step], str, dict[str, Any]]:
    """The steps, what stopped the ramp, and the echo backend's counters at the end."""
    cycle, _ = talk_cycle()
    steps: list[Step] = []
    stopped = f"reached {args.steps[-1]} calls without saturation" + (
        "" if args.keep_going else ", late frames or loss"
    )
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as http:
        client = TalkingLoad(http, stack.url, direct=stack.internal, cycle=cycle)
        try:
            for target in args.steps:
                step = await run_step(stack, client, target, args)
                steps.append(step)
                print(progress_line(step), flush=True)
                reason = limit_reached(step, args.keep_going)
                if reason is not None:
                    stopped = reason
                    break
            backend = await asyncio.to_thread(stack.backend_stats)
        finally:
            client.close_all()
    return steps, stopped, backend


def progress_line(s: Step) -> str:
    return (
        f"  {s.calls:4d} calls: transceiver {s.trx_cpu:.0%} ({100 * s.trx_cpu_per_call:.2f}% a "
        f"call), late {s.late:.3%} (out {s.late_out}, in {s.late_in}), loss up {s.loss_up:.3%} "
        f"down {s.loss_down:.3%}, backend {s.backend_cpu:.0%}, load client {s.client_cpu:.0%}, "
        f"turns {s.turns}, interruptions {s.interruptions}"
    )


def capacity(steps: list[Step]) -> dict[str, Any]:
    """The largest good step, and calls per core extrapolated from its CPU per call."""
    good = [s for s in steps if s.ok]
    if not good:
        return {"measured_calls": 0}
    best = max(good, key=lambda s: s.calls)
    return {
        "measured_calls": best.calls,
        "at_trx_cpu": best.trx_cpu,
        "trx_cpu_per_call": best.trx_cpu_per_call,
        "trx_us_per_frame": best.trx_us_per_frame,
        "extrapolated_calls_per_core": 1 / best.trx_cpu_per_call,
    }


# Profile ---------------------------------------------------------------------------------------
async def profile_run(stack: Stack, calls: int, args: argparse.Namespace) -> Step:
    cycle, _ = talk_cycle()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
        client = TalkingLoad(http, stack.url, direct=stack.internal, cycle=cycle)
        try:
            step = await run_step(stack, client, calls, args)
        finally:
            client.close_all()
    return step


def profile_written(path: Path) -> bool:
    """True once the profile is there and whole."""
    try:
        pstats.Stats(str(path))
    except (OSError, EOFError, ValueError, TypeError):
        return False
    return True


def profile_top(path: Path, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The profile's top functions by own time, and own time per source file."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{short_path(filename)}:{line}({name})",
                "calls": calls,
                "tottime_s": tottime,
                "share": tottime / total if total else float("nan"),
                "cumtime_s": cumtime,
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:count], by_module(rows, total)


def by_module(rows: list[dict[str, Any]], total: float) -> list[dict[str, Any]]:
    """Own time summed per source file (C functions called from Python: 'built-in')."""
    sums: Counter[str] = Counter()
    for row in rows:
        where = row["function"].split(":", 1)[0]
        sums["built-in (C)" if where == "~" else where] += row["tottime_s"]
    return [
        {"module": module, "tottime_s": own, "share": own / total if total else float("nan")}
        for module, own in sums.most_common()
    ]


def short_path(filename: str) -> str:
    for marker in ("site-packages/", "voicerelay/", "python3.11/"):
        if marker in filename:
            return (
                filename.split(marker, 1)[1]
                if marker != "voicerelay/"
                else ("voicerelay/" + filename.split(marker, 1)[1])
            )
    return filename


# Output ----------------------------------------------------------------------------------------
def step_table(steps: list[Step]) -> str:
    headers = [
        "calls",
        "trx CPU %",
        "trx %/call",
        "trx us/frame",
        "frames in",
        "out/in",
        "late out",
        "late in",
        "late %",
        "loss up %",
        "loss down %",
        "jitter p99 ms",
        "turns",
        "barge-ins",
        "backend %",
        "client %",
        "others trx core %",
    ]
    rows = [
        [
            s.calls,
            100 * s.trx_cpu,
            100 * s.trx_cpu_per_call,
            s.trx_us_per_frame,
            s.frames_in,
            s.out_share,
            s.late_out,
            s.late_in,
            100 * s.late,
            100 * s.loss_up,
            100 * s.loss_down,
            s.reply_jitter_p99_ms,
            s.turns,
            s.interruptions,
            100 * s.backend_cpu,
            100 * s.client_cpu,
            100 * s.others_test_core,
        ]
        for s in steps
    ]
    title = (
        "Ramp: calls talking in turns (CPU in % of one core; trx us/frame = transceiver CPU per "
        "20 ms frame in or out; late out = pacer late slots, late in = concealed or FEC-recovered "
        "frames; jitter = reply packets against their RTP clock at the client)"
    )
    return harness.table(title, headers, rows)


def summary_table(steps: list[Step], stopped: str, cap: dict[str, Any]) -> str:
    rows = [["ramp stopped by", stopped]]
    if cap["measured_calls"]:
        rows.append(
            [
                "MEASURED calls at < 0.1% late frames and 0 loss (largest good step)",
                f"{cap['measured_calls']} (transceiver at {cap['at_trx_cpu']:.0%} of its core)",
            ]
        )
        per_core = cap["extrapolated_calls_per_core"]
        rows.append(
            [
                "EXTRAPOLATED calls per core (1 core / transceiver CPU per call)",
                f"{per_core:.0f} ({100 * cap['trx_cpu_per_call']:.2f}% of a core a call, "
                f"{cap['trx_us_per_frame']:.0f} us a frame); {per_core / BUDGET_CALLS:.2f}x "
                "the budget",
            ]
        )
        rows.append(
            [
                "anchors",
                f"LiveKit Agents 4-5 rooms/CPU: {per_core / 4.5:.0f}x; Pipecat ~20% of a core "
                f"a call (5/core): {per_core / 5:.0f}x",
            ]
        )
    else:
        rows.append(["MEASURED", "none: the first step already had late frames or loss"])
    rows.append(["budget", f">= {BUDGET_CALLS} decoded-audio calls a core, < 0.1% late frames"])
    return harness.table("Agent calls per core", ["figure", "value"], rows)


def contention_warnings(steps: list[Step]) -> list[str]:
    """Steps where other processes used the transceiver's core (its late frames then say more
    about them than about the transceiver)."""
    return [
        f"warning: at {s.calls} calls other processes used {s.others_test_core:.0%} of the "
        "transceiver's core"
        for s in steps
        if s.others_test_core > CONTENDED
    ]


# Main ------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter windows")
    parser.add_argument("--steps", default=None, help="comma-separated call counts")
    parser.add_argument("--window", type=float, default=None, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=None, help="talking before the window")
    parser.add_argument("--concurrency", type=int, default=20, help="calls in setup at once")
    parser.add_argument(
        "--profile", type=int, default=None, metavar="CALLS", help="profile the transceiver"
    )
    parser.add_argument("--top", type=int, default=25, help="--profile: functions to list")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="go on past late frames or loss (stop only at saturation or failures)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the processes under test (e.g. -10 on a machine others share; root)",
    )
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    args.steps = sorted(set(steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)))
    args.window = args.window or (4.0 if args.quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 4.0)
    return args


def run_profile(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """One step of `args.profile` calls with the transceiver profiled over the window."""
    with tempfile.TemporaryDirectory(prefix="vr-agent-profile-") as tmp:
        path = Path(tmp) / "transceiver.prof"
        with agent_stack(profile=path, nice=args.nice) as stack:
            step = uvloop.run(profile_run(stack, args.profile, args))
            wait_for(lambda: profile_written(path), 30, 0.1, "the transceiver's profile")
        top, modules = profile_top(path, args.top)
    print(progress_line(step))
    figures = {
        "profile_calls": args.profile,
        "window_s": args.window,
        "step": asdict(step),
        "top_by_own_time": top,
        "by_module": modules,
    }
    title = (
        f"Transceiver under cProfile (CPU time), {args.profile} calls over the {args.window:g} s "
        "window: top functions by own time (cProfile inflates Python's share; C work called "
        "through cffi counts in its Python caller)"
    )
    tables = [
        harness.table(
            title,
            ["function", "calls", "own s", "share %", "cum s"],
            [
                [r["function"], r["calls"], r["tottime_s"], 100 * r["share"], r["cumtime_s"]]
                for r in top
            ],
        ),
        harness.table(
            "Own time per source file",
            ["module", "own s", "share %"],
            [[m["module"], m["tottime_s"], 100 * m["share"]] for m in modules[: args.top]],
        ),
    ]
    harness.report("agent_capacity_profile", tables, figures, info)


def main() -> None:
    args = parse_args()
    info = harness.machine()
    if args.profile:
        run_profile(args, info)
        return
    started = time.monotonic()
    with agent_stack(nice=args.nice) as stack:
        print(
            f"transceiver on core {stack.test_core}; echo backend + load client on core "
            f"{stack.driver_core}; steps {args.steps}, {args.window:g} s windows",
            flush=True,
        )
        steps, stopped, backend = uvloop.run(ramp(stack, args))
        if any(s.failures or s.sessions_gone for s in steps):
            print(f"the transceiver's log, last lines:\n{stack.log.read_text()[-3000:]}")
    cap = capacity(steps)
    cycle, speech_frames = talk_cycle()
    figures = {
        "quick": args.quick,
        "nice": args.nice,
        "keep_going": args.keep_going,
        "window_s": args.window,
        "turn_cycle_s": len(cycle) * 0.02,
        "speech_s": speech_frames * 0.02,
        "headline": {**cap, "ramp_stopped_by": stopped, "budget_calls": BUDGET_CALLS},
        "steps": [asdict(s) for s in steps],
        "echo_backend": backend,
        "warnings": contention_warnings(steps),
        "seconds": time.monotonic() - started,
    }
    tables = [step_table(steps), summary_table(steps, stopped, cap)]
    harness.report("agent_capacity", tables, figures, info)
    for line in figures["warnings"]:
        print(line)


if __name__ == "__main__":
    main()
