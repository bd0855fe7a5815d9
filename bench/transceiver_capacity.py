"""Transceiver capacity: echo sessions at 50 packets/s each way, through the relay and direct.

Budget (DESIGN.md): >= 500 concurrent sessions a core at 50 packets/s each way, < 0.1% loss.

The transceiver runs alone on one core; the relay worker and this load client (the project's own
client-role Session, one UDP socket per call, one 20 ms ticker for all calls) share the other.
Per path ("relay": the real packet path; "direct": the load client speaks envelopes to the
transceiver itself, which leaves the whole driver core to the load client):
1. DTLS handshakes per second: open K sessions as fast as bounded concurrency allows.
2. Ramp: add sessions (50 in setup at once), then per step: warm up, measure CPU over a window,
   stop audio, drain, and compare what the clients sent/got back with the transceiver's own
   per-session counters (loss each way). Stop at >= 0.1% loss or when a core saturates.

Run: .venv/bin/python bench/transceiver_capacity.py [--quick] [--max-sessions N] [--path P]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import harness
import uvloop
from loadclient import (
    PAYLOAD_SIZE,
    PHASES,
    Counts,
    Drops,
    LoadClient,
    Meters,
    Stack,
    bench_stack,
    drain,
    socket_drops,
    wait_sessions,
)

LOSS_LIMIT = 0.001  # the budget: < 0.1%
SATURATED = 0.95  # share of a core at which the transceiver counts as saturated
DRIVER_SATURATED = 0.95  # load client + relay worker on the driver core
MISSED_TICKS_LIMIT = 0.01  # the load client could not keep its 20 ms ticker
CONTENDED = 0.10  # others' share of one of our cores worth a warning
DEFAULT_STEPS = (50, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1200, 1500, 1800)
PATHS = ("relay", "direct")


@dataclass
class Step:
    """One ramp step's figures (CPU as shares of one core)."""

    sessions: int
    pps_up: float  # packets/s clients -> transceiver (all sessions)
    pps_down: float  # packets/s echoed back to the clients
    loss_up: float
    loss_down: float
    trx_cpu: float
    trx_us_per_echo: float  # transceiver CPU per echo: one SRTP packet in + one out
    trx_cpu_per_session: float
    relay_cpu: float
    client_cpu: float
    others_trx_core: float  # other processes on the transceiver's core (should be ~0)
    others_driver_core: float
    missed_ticks: float  # share of 20 ms ticks the load client was too late for
    setup_failures: int
    packets_counted: int
    drops_trx: int  # datagrams the kernel dropped at the transceiver's full socket buffer
    drops_relay: int  # ... at the relay worker's sockets
    drops_clients: int  # ... at the load client's sockets

    @property
    def ok(self) -> bool:
        return self.loss_up < LOSS_LIMIT and self.loss_down < LOSS_LIMIT and not self.setup_failures


# Handshakes -------------------------------------------------------------------------------------
async def measure_handshakes(
    stack: Stack, client: LoadClient, count: int, concurrency: int
) -> dict[str, Any]:
    """Open `count` sessions (bounded concurrency): handshakes/s and CPU per handshake."""
    meters = Meters(stack).start()
    result = await client.open_calls(count, concurrency)
    meters.stop()
    client.close_all()
    left = await wait_sessions(stack, 0)
    return {
        "sessions": count,
        "concurrency": concurrency,
        "opened": result.opened,
        "failed": result.failed,
        "errors": result.errors[:5],
        "seconds": result.seconds,
        "handshakes_per_s": result.opened / result.seconds if result.seconds else float("nan"),
        "setup_ms_p50": harness.percentile(result.setup_ms, 50),
        "setup_ms_p99": harness.percentile(result.setup_ms, 99),
        "signaling_ms_p50": harness.percentile(result.signaling_ms, 50),
        "ice_ms_p50": harness.percentile(result.ice_ms, 50),
        "dtls_ms_p50": harness.percentile(result.dtls_ms, 50),
        "trx_cpu": meters.transceiver.utilisation,
        "trx_ms_per_handshake": 1000 * meters.transceiver.cpu / max(1, result.opened),
        "client_cpu": meters.client.utilisation,
        "client_ms_per_handshake": 1000 * meters.client.cpu / max(1, result.opened),
        "relay_cpu": meters.relay.utilisation,
        "others_trx_core": meters.others_on_trx_core,
        "others_driver_core": meters.others_on_driver_core,
        "sessions_left_after_close": left,
    }


# Ramp -------------------------------------------------------------------------------------------
async def run_step(stack: Stack, client: LoadClient, target: int, args: argparse.Namespace) -> Step:
    """Grow to `target` sessions, then measure one window of 50 packets/s each way per session."""
    setup = await client.open_calls(target - len(client.calls), args.concurrency)
    before = await client.server_counts()  # quiescent: no audio flows between steps
    drops_before = socket_drops(stack, client.calls)
    client.start_ticker()
    await asyncio.sleep(args.warmup)
    ticks0, missed0 = client.ticks, client.missed_ticks
    window0 = client.client_counts()
    meters = Meters(stack).start()
    await asyncio.sleep(args.window)
    meters.stop()
    window = client.client_counts() - window0
    ticks, missed = client.ticks - ticks0, client.missed_ticks - missed0
    client.stop_ticker()
    await drain()
    step = (await client.server_counts()) - before
    drops = socket_drops(stack, client.calls) - drops_before
    return step_figures(len(client.calls), setup.failed, meters, window, step, drops, ticks, missed)


def step_figures(
    sessions: int,
    failures: int,
    meters: Meters,
    window: Counts,
    step: Counts,
    drops: Drops,
    ticks: int,
    missed: int,
) -> Step:
    """A step's figures: rates and CPU from the window, loss from the whole step."""
    trx = meters.transceiver
    wall = trx.wall or float("nan")
    return Step(
        sessions=sessions,
        pps_up=window.sent / wall,
        pps_down=window.echoed / wall,
        loss_up=step.loss_up,
        loss_down=step.loss_down,
        trx_cpu=trx.utilisation,
        trx_us_per_echo=1e6 * trx.cpu / max(1, window.echoed),
        trx_cpu_per_session=trx.utilisation / sessions if sessions else float("nan"),
        relay_cpu=meters.relay.utilisation,
        client_cpu=meters.client.utilisation,
        others_trx_core=meters.others_on_trx_core,
        others_driver_core=meters.others_on_driver_core,
        missed_ticks=missed / max(1, ticks + missed),
        setup_failures=failures,
        packets_counted=step.sent,
        drops_trx=drops.transceiver,
        drops_relay=drops.relay,
        drops_clients=drops.clients,
    )


def limit_reached(step: Step, target: int) -> str | None:
    """Why the ramp must stop after this step (None: go on)."""
    if step.setup_failures:
        return f"session setup failed for {step.setup_failures} calls on the way to {target}"
    if not step.ok:
        return (
            f"loss >= {LOSS_LIMIT:.1%} at {step.sessions} sessions "
            f"(up {step.loss_up:.2%}, down {step.loss_down:.2%}; socket-buffer drops: "
            f"transceiver {step.drops_trx}, relay {step.drops_relay}, "
            f"clients {step.drops_clients})"
        )
    if step.trx_cpu >= SATURATED:
        return f"transceiver saturated ({step.trx_cpu:.0%} of its core)"
    if step.missed_ticks > MISSED_TICKS_LIMIT:
        return f"load client fell behind its 20 ms ticker ({step.missed_ticks:.1%} ticks late)"
    if step.client_cpu + step.relay_cpu >= DRIVER_SATURATED:
        return (
            f"driver core saturated (load client {step.client_cpu:.0%} + relay worker "
            f"{step.relay_cpu:.0%})"
        )
    return None


async def ramp(
    stack: Stack, client: LoadClient, args: argparse.Namespace
) -> tuple[list[Step], str]:
    """Run the steps until loss or saturation; returns the steps and what stopped the ramp."""
    steps: list[Step] = []
    stopped = f"reached --max-sessions {args.max_sessions} without loss or saturation"
    try:
        for target in args.steps:
            step = await run_step(stack, client, target, args)
            steps.append(step)
            print(progress_line(step), flush=True)
            reason = limit_reached(step, target)
            if reason is not None:
                stopped = reason
                break
    finally:
        client.close_all()
        await wait_sessions(stack, 0)
    return steps, stopped


def progress_line(step: Step) -> str:
    return (
        f"  {step.sessions:5d} sessions: loss up {step.loss_up:.3%} down {step.loss_down:.3%}, "
        f"transceiver {step.trx_cpu:.0%}, relay {step.relay_cpu:.0%}, "
        f"load client {step.client_cpu:.0%}, late ticks {step.missed_ticks:.1%}, "
        f"others on trx core {step.others_trx_core:.0%}"
    )


async def run_path(
    stack: Stack, http: aiohttp.ClientSession, path: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Handshake burst then ramp, over one path."""
    direct = stack.transceiver.internal if path == "direct" else None
    print(f"[{path}] handshake burst: {args.handshakes} sessions, {args.concurrency} in flight")
    burst = LoadClient(http, stack.transceiver.url, direct=direct, phases=args.phases)
    handshakes = await measure_handshakes(stack, burst, args.handshakes, args.concurrency)
    print(f"[{path}] ramp: {args.steps}, {args.window:g} s windows", flush=True)
    client = LoadClient(
        http,
        stack.transceiver.url,
        direct=direct,
        certificate=burst.certificate,
        phases=args.phases,
    )
    steps, stopped = await ramp(stack, client, args)
    return {
        "path": path,
        "handshakes": handshakes,
        "steps": steps,
        "stopped": stopped,
        "capacity": capacity(steps),
    }


# Summary ----------------------------------------------------------------------------------------
def capacity(steps: list[Step]) -> dict[str, Any]:
    """Measured sessions at < 0.1% loss, and the CPU-extrapolated sessions per core."""
    good = [s for s in steps if s.ok]
    best = max(good, key=lambda s: s.sessions) if good else None
    if best is None:
        return {"measured_sessions": 0, "at_trx_cpu": float("nan")}
    return {
        "measured_sessions": best.sessions,
        "at_trx_cpu": best.trx_cpu,
        "extrapolated_sessions_per_core": 1 / best.trx_cpu_per_session,
        "trx_cpu_per_session": best.trx_cpu_per_session,
        "trx_us_per_echo": best.trx_us_per_echo,
    }


def step_table(path: str, steps: list[Step]) -> str:
    headers = [
        "sessions",
        "pkt/s up",
        "pkt/s down",
        "loss up %",
        "loss down %",
        "trx CPU %",
        "trx us/echo",
        "trx %/session",
        "relay CPU %",
        "client CPU %",
        "late ticks %",
        "others trx core %",
        "drops trx/relay/client",
    ]
    rows = [
        [
            s.sessions,
            s.pps_up,
            s.pps_down,
            100 * s.loss_up,
            100 * s.loss_down,
            100 * s.trx_cpu,
            s.trx_us_per_echo,
            100 * s.trx_cpu_per_session,
            100 * s.relay_cpu,
            100 * s.client_cpu,
            100 * s.missed_ticks,
            100 * s.others_trx_core,
            f"{s.drops_trx}/{s.drops_relay}/{s.drops_clients}",
        ]
        for s in steps
    ]
    title = (
        f"Ramp, path {path}: 50 pkt/s each way per session, {PAYLOAD_SIZE}-byte payloads "
        "(echo = 1 SRTP packet in + 1 out; CPU in % of one core)"
    )
    return harness.table(title, headers, rows)


def handshake_table(results: list[dict[str, Any]]) -> str:
    headers = [
        "path",
        "sessions",
        "in flight",
        "failed",
        "seconds",
        "handshakes/s",
        "setup p50 ms",
        "setup p99 ms",
        "trx CPU %",
        "trx ms/setup",
        "client CPU %",
        "client ms/setup",
        "relay CPU %",
        "others trx core %",
    ]
    rows = []
    for r in results:
        h = r["handshakes"]
        rows.append(
            [
                r["path"],
                h["sessions"],
                h["concurrency"],
                h["failed"],
                h["seconds"],
                h["handshakes_per_s"],
                h["setup_ms_p50"],
                h["setup_ms_p99"],
                100 * h["trx_cpu"],
                h["trx_ms_per_handshake"],
                100 * h["client_cpu"],
                h["client_ms_per_handshake"],
                100 * h["relay_cpu"],
                100 * h["others_trx_core"],
            ]
        )
    title = (
        "DTLS handshakes: sessions opened at once until all secure (offer -> ICE -> DTLS; "
        "CPU per setup covers signaling + ICE + DTLS + SRTP keys)"
    )
    return harness.table(title, headers, rows)


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        cap = r["capacity"]
        rows.append([r["path"], "ramp stopped by", r["stopped"]])
        measured = (
            f"{cap['measured_sessions']} (transceiver at {cap['at_trx_cpu']:.0%} of its core)"
            if cap["measured_sessions"]
            else "none: the first step already lost >= 0.1%"
        )
        rows.append([r["path"], "MEASURED sessions at < 0.1% loss (largest good step)", measured])
        if "extrapolated_sessions_per_core" in cap:
            rows.append(
                [
                    r["path"],
                    "EXTRAPOLATED sessions per core (1 core / trx CPU per session)",
                    f"{cap['extrapolated_sessions_per_core']:.0f} "
                    f"({100 * cap['trx_cpu_per_session']:.3f}% of a core per session, "
                    f"{cap['trx_us_per_echo']:.1f} us per echo)",
                ]
            )
        h = r["handshakes"]
        rows.append(
            [
                r["path"],
                "DTLS handshakes per second (measured)",
                f"{h['handshakes_per_s']:.0f}/s; transceiver {h['trx_ms_per_handshake']:.2f} ms "
                f"CPU each -> {1000 / h['trx_ms_per_handshake']:.0f}/s a core (extrapolated)",
            ]
        )
    rows.append(["", "budget", ">= 500 sessions a core at 50 pkt/s each way, < 0.1% loss"])
    return harness.table("Transceiver capacity", ["path", "figure", "value"], rows)


def contention_warnings(results: list[dict[str, Any]]) -> list[str]:
    """Lines naming steps where other processes used our cores (figures then understate)."""
    lines = []
    for r in results:
        h = r["handshakes"]
        if h["others_trx_core"] > CONTENDED or h["others_driver_core"] > CONTENDED:
            lines.append(
                f"warning [{r['path']}] handshake burst: other processes used "
                f"{h['others_trx_core']:.0%} of the transceiver's core and "
                f"{h['others_driver_core']:.0%} of the driver core"
            )
        for s in r["steps"]:
            if s.others_trx_core > CONTENDED or s.others_driver_core > CONTENDED:
                lines.append(
                    f"warning [{r['path']}] {s.sessions} sessions: other processes used "
                    f"{s.others_trx_core:.0%} of the transceiver's core and "
                    f"{s.others_driver_core:.0%} of the driver core"
                )
    return lines


# Main -------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, few steps (dev runs)")
    parser.add_argument("--max-sessions", type=int, default=None, help="last ramp step")
    parser.add_argument("--steps", default=None, help="comma-separated session counts")
    parser.add_argument("--window", type=float, default=None, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of audio before one")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in setup at once")
    parser.add_argument("--handshakes", type=int, default=None, help="sessions in the burst")
    parser.add_argument(
        "--phases",
        type=int,
        default=PHASES,
        help="send groups per 20 ms, spread evenly (1: every call sends at the same instant)",
    )
    parser.add_argument(
        "--path", choices=(*PATHS, "both"), default="both", help="relay, direct or both"
    )
    args = parser.parse_args()
    args.max_sessions = args.max_sessions or (300 if args.quick else 1800)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else list(DEFAULT_STEPS)
    args.steps = sorted({s for s in steps if s < args.max_sessions} | {args.max_sessions})
    args.window = args.window or (2.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.handshakes = args.handshakes or (100 if args.quick else 300)
    args.paths = PATHS if args.path == "both" else (args.path,)
    return args


async def run(stack: Stack, args: argparse.Namespace) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
        return [await run_path(stack, http, path, args) for path in args.paths]


def main() -> None:
    args = parse_args()
    info = harness.machine()
    started = time.monotonic()
    with bench_stack() as stack:
        print(
            f"transceiver on core {stack.test_core}; relay worker + load client on core "
            f"{stack.driver_core}",
            flush=True,
        )
        results = uvloop.run(run(stack, args))
    figures = {
        "quick": args.quick,
        "window_s": args.window,
        "packets_per_s_each_way_per_session": 50,
        "payload_bytes": PAYLOAD_SIZE,
        "send_phases_per_20ms": args.phases,
        "headline": {
            r["path"]: {
                **r["capacity"],
                "ramp_stopped_by": r["stopped"],
                "handshakes_per_s": r["handshakes"]["handshakes_per_s"],
                "trx_ms_per_handshake": r["handshakes"]["trx_ms_per_handshake"],
            }
            for r in results
        },
        "paths": {r["path"]: {**r, "steps": [asdict(s) for s in r["steps"]]} for r in results},
        "warnings": contention_warnings(results),
        "seconds": time.monotonic() - started,
    }
    tables = [
        handshake_table(results),
        *(step_table(r["path"], r["steps"]) for r in results),
        summary_table(results),
    ]
    harness.report("transceiver_capacity", tables, figures, info)
    for line in figures["warnings"]:
        print(line)


if __name__ == "__main__":
    main()
