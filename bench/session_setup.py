"""Session setup: offer posted to first echoed audio, p50 and p99, through the relay and direct.

Budget (DESIGN.md): offer to first echoed audio <= 100 ms on loopback (through the relay).

Each call is the project's own client-role Session (bench/loadclient.py's stack): POST the
offer, ICE, DTLS; it sends its first 20 ms Opus-sized packet the moment DTLS is up (what a real
client does) and one every 20 ms after, until the first echo arrives. "direct" calls wrap their
datagrams in the relay envelope themselves and talk to the transceiver's internal port: the
zero-hop baseline. Relay and direct calls alternate, so both see the same machine.
Optionally a few calls with aiortc (`relayctl call`'s client) show what a real WebRTC client
sees through the relay.

Run: .venv/bin/python bench/session_setup.py [--quick] [--calls N] [--aiortc K]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import harness
import uvloop
from loadclient import PAYLOAD_SIZE, RTP_TICKS, TICK, Stack, bench_stack, wait_sessions

from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.wire.addr import Addr

BUDGET_MS = 100.0
FIRST_ECHO_TIMEOUT = 5.0


@dataclass
class Timing:
    """Milliseconds from the offer being posted to each milestone of one call."""

    answered: float
    ice: float
    secure: float
    first_echo: float


@dataclass
class PathResult:
    path: str
    timings: list[Timing] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def column(self, name: str) -> list[float]:
        return [getattr(t, name) for t in self.timings]


# One call ---------------------------------------------------------------------------------------
async def one_call(
    http: aiohttp.ClientSession, url: str, certificate: Certificate, direct: Addr | None
) -> Timing:
    """Place a call; send audio from the moment it is secure; time the first echo."""
    call = ClientCall(certificate)
    try:
        await call.connect(http, url, CallOptions(direct=direct, keep_packets=False))
        await asyncio.wait_for(call.secure, FIRST_ECHO_TIMEOUT)
        await talk_until_echo(call)
        return timing(call)
    finally:
        call.close()


async def talk_until_echo(call: ClientCall) -> None:
    """One packet now, then one every 20 ms, until the first echoed packet is back."""
    payload = bytes(PAYLOAD_SIZE)
    timestamp = 0
    deadline = time.monotonic() + FIRST_ECHO_TIMEOUT
    while call.first_rtp_at is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no echo within {FIRST_ECHO_TIMEOUT:g} s of DTLS")
        timestamp += RTP_TICKS
        call.send_audio(payload, timestamp)
        await asyncio.sleep(TICK)  # the echo is timestamped on arrival, not when we look


def timing(call: ClientCall) -> Timing:
    assert call.answered_at and call.secure_at and call.first_rtp_at

    def ms(at: float) -> float:
        return (at - call.posted_at) * 1000

    return Timing(
        answered=ms(call.answered_at),
        ice=ms(call.ice_connected_at or call.secure_at),
        secure=ms(call.secure_at),
        first_echo=ms(call.first_rtp_at),
    )


# Runs -------------------------------------------------------------------------------------------
async def run_calls(stack: Stack, args: argparse.Namespace) -> list[PathResult]:
    """`args.calls` calls per path, relay and direct alternating, `args.concurrency` at once."""
    certificate = Certificate.generate()
    paths: dict[str, Addr | None] = {"relay": None, "direct": stack.transceiver.internal}
    results = {name: PathResult(name) for name in paths}
    gate = asyncio.Semaphore(args.concurrency)

    async def place(name: str, record: bool) -> None:
        async with gate:
            try:
                t = await one_call(http, stack.transceiver.url, certificate, paths[name])
            except Exception as exc:  # noqa: BLE001 - a failed call is a figure too
                results[name].failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if record:
                results[name].timings.append(t)

    async with aiohttp.ClientSession() as http:
        for name in paths:  # warm up: first call pays imports, TCP connect, caches
            await place(name, record=False)
        order = [name for _ in range(args.calls) for name in paths]
        await asyncio.gather(*(place(name, record=True) for name in order))
    await wait_sessions(stack, 0)
    return list(results.values())


async def run_aiortc(stack: Stack, count: int) -> list[dict[str, Any]]:
    """A few calls with aiortc through the relay: what a real WebRTC client sees."""
    from voicerelay.cli.call_client import place_call

    reports = []
    for i in range(count):
        report = await place_call(stack.transceiver.url, 440.0 + 10 * i, seconds=0.2, timeout=10)
        reports.append({"setup_ms": report.setup_ms, "error": report.error})
    return reports


# Output -----------------------------------------------------------------------------------------
def path_table(results: list[PathResult]) -> str:
    headers = [
        "path",
        "calls",
        "failed",
        "answer p50",
        "ICE p50",
        "secure p50",
        "echo p50",
        "echo p99",
        "echo max",
    ]
    rows = []
    for r in results:
        echo = r.column("first_echo")
        rows.append(
            [
                r.path,
                len(r.timings),
                len(r.failures),
                harness.percentile(r.column("answered"), 50),
                harness.percentile(r.column("ice"), 50),
                harness.percentile(r.column("secure"), 50),
                harness.percentile(echo, 50),
                harness.percentile(echo, 99),
                max(echo) if echo else float("nan"),
            ]
        )
    title = (
        "Offer posted -> milestone, ms (project client; first audio sent as DTLS comes up; "
        "'direct' = envelopes straight to the transceiver, no relay)"
    )
    return harness.table(title, headers, rows)


def summary(results: list[PathResult], aiortc: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r.path: r.column("first_echo") for r in results}
    relay, direct = by["relay"], by["direct"]
    out: dict[str, Any] = {
        "relay_p50_ms": harness.percentile(relay, 50),
        "relay_p99_ms": harness.percentile(relay, 99),
        "direct_p50_ms": harness.percentile(direct, 50),
        "direct_p99_ms": harness.percentile(direct, 99),
        "budget_ms": BUDGET_MS,
    }
    out["relay_added_p50_ms"] = out["relay_p50_ms"] - out["direct_p50_ms"]
    out["relay_added_p99_ms"] = out["relay_p99_ms"] - out["direct_p99_ms"]
    setups = [a["setup_ms"] for a in aiortc if a["setup_ms"] is not None]
    if aiortc:
        out["aiortc_calls"] = len(aiortc)
        out["aiortc_failed"] = len(aiortc) - len(setups)
        out["aiortc_p50_ms"] = harness.percentile(setups, 50)
        out["aiortc_max_ms"] = max(setups) if setups else float("nan")
    return out


def summary_table(s: dict[str, Any]) -> str:
    rows = [
        ["through the relay: p50 / p99 ms", f"{s['relay_p50_ms']:.1f} / {s['relay_p99_ms']:.1f}"],
        ["direct: p50 / p99 ms", f"{s['direct_p50_ms']:.1f} / {s['direct_p99_ms']:.1f}"],
        [
            "relay added: p50 / p99 ms",
            f"{s['relay_added_p50_ms']:.2f} / {s['relay_added_p99_ms']:.2f}",
        ],
        ["budget (through the relay)", f"<= {BUDGET_MS:.0f} ms"],
    ]
    if "aiortc_calls" in s:
        rows.append(
            [
                f"aiortc through the relay ({s['aiortc_calls']} calls, {s['aiortc_failed']} failed)"
                ": p50 / max ms",
                f"{s['aiortc_p50_ms']:.1f} / {s['aiortc_max_ms']:.1f}",
            ]
        )
    title = (
        "Offer to first echoed audio (aiortc: a real WebRTC client; its figure adds its ICE "
        "pacing, Opus encode/decode and its audio jitter buffer, which holds 4 packets = 80 ms "
        "before the first frame)"
    )
    return harness.table(title, ["figure", "value"], rows)


# Main -------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (dev runs)")
    parser.add_argument("--calls", type=int, default=None, help="calls per path [50]")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in setup at once")
    parser.add_argument("--aiortc", type=int, default=None, help="aiortc calls [3; 0 skips]")
    args = parser.parse_args()
    args.calls = args.calls or (15 if args.quick else 50)
    if args.aiortc is None:
        args.aiortc = 1 if args.quick else 3
    return args


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    results = await run_calls(stack, args)
    aiortc = await run_aiortc(stack, args.aiortc) if args.aiortc else []
    return {"results": results, "aiortc": aiortc}


def main() -> None:
    args = parse_args()
    info = harness.machine()
    started = time.monotonic()
    with bench_stack() as stack:
        out = uvloop.run(run(stack, args))
    results, aiortc = out["results"], out["aiortc"]
    figures = {
        "calls_per_path": args.calls,
        "concurrency": args.concurrency,
        "summary": summary(results, aiortc),
        "paths": {
            r.path: {
                "timings_ms": [t.__dict__ for t in r.timings],
                "failures": r.failures,
            }
            for r in results
        },
        "aiortc": aiortc,
        "seconds": time.monotonic() - started,
    }
    tables = [path_table(results), summary_table(figures["summary"])]
    harness.report("session_setup", tables, figures, info)


if __name__ == "__main__":
    main()
