"""Run every benchmark in turn, then print the headline figures against the design's budgets.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark is its own script (and can be run alone); this one runs them one after another,
never two at a time, so they do not disturb each other's figures. The summary reads the JSON
each writes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import harness

BENCHMARKS = (
    "relay_forwarding",
    "peer_coturn",
    "relay_latency",
    "flowtable_scale",
    "router_junk",
    "flood",
    "transceiver_capacity",
    "session_setup",
    "peer_aiortc",
    "peer_janus",
    "recovery",
    "voice_latency",
    "agent_capacity",
)


def _get(doc: Any, *keys: str | int) -> Any:
    for key in keys:
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


# (benchmark, what, how to read the figure from its JSON, unit, budget)
Headline = tuple[str, str, Callable[[dict[str, Any]], Any], str, str]
HEADLINES: tuple[Headline, ...] = (
    (
        "relay_forwarding",
        "relay CPU per forwarded packet / C",
        lambda d: d.get("relay_over_c"),
        "x",
        "<= 1.3x",
    ),
    (
        "relay_forwarding",
        "relay CPU per forwarded packet",
        lambda d: d.get("relay_cpu_us_per_packet"),
        "us",
        "",
    ),
    (
        "relay_forwarding",
        "max packets/s per worker, each way",
        lambda d: d.get("relay_max_pps_per_worker_each_way"),
        "pps",
        "",
    ),
    (
        "peer_coturn",
        "relay / coturn CPU per packet, worst rate from 10k/s",
        lambda d: _get(d, "worst", "relay_over_coturn"),
        "x",
        "<= 0.9x",
    ),
    (
        "peer_coturn",
        "relay / C CPU per packet, worst rate from 10k/s",
        lambda d: _get(d, "worst", "relay_over_c"),
        "x",
        "<= 1.15x",
    ),
    (
        "peer_coturn",
        "max packets/s each way at 0 loss: relay / coturn",
        lambda d: _pair(d.get("max_pps_each_way"), "relay", "coturn"),
        "pps",
        "",
    ),
    (
        "peer_coturn",
        "relay-kernel / C extra machine CPU per packet, worst rate",
        lambda d: _get(d, "worst", "relay_kernel_over_c_machine"),
        "x",
        "<= 0.3x",
    ),
    (
        "relay_latency",
        "kernel path added latency <= the C forwarder's (p50, p99, p99.9)",
        lambda d: _get(d, "kernel_budget_met"),
        "",
        "True",
    ),
    (
        "peer_janus",
        "transceiver / Janus EchoTest calls a core (by CPU)",
        lambda d: _get(d, "summary", "transceiver_vs", "janus", "calls_a_core_by_cpu"),
        "x",
        ">= 3x",
    ),
    (
        "peer_janus",
        "transceiver / aiortc echo calls a core (by CPU)",
        lambda d: _get(d, "summary", "transceiver_vs", "aiortc", "calls_a_core_by_cpu"),
        "x",
        ">= 10x",
    ),
    (
        "relay_latency",
        "relay added round trip p50 over direct",
        lambda d: _get(d, "added_us", "relay", "p50"),
        "us",
        "<= 30 us",
    ),
    (
        "relay_latency",
        "relay added round trip p99 over direct",
        lambda d: _get(d, "added_us", "relay", "p99"),
        "us",
        "<= 150 us",
    ),
    (
        "relay_latency",
        "relay added round trip p50 over C forwarder",
        lambda d: _get(d, "relay_over_c_us", "p50"),
        "us",
        "",
    ),
    (
        "flowtable_scale",
        "known-flow packet at the largest size / at 1k (spread)",
        lambda d: _size_ratio(d, "client_datagram_ns"),
        "x",
        "flat",
    ),
    (
        "flowtable_scale",
        "known-flow packet at the largest size / at 1k (1k hot)",
        lambda d: _size_ratio(d, "client_datagram_hot_ns"),
        "x",
        "flat",
    ),
    (
        "flowtable_scale",
        "shared memory per slot",
        lambda d: _get(d, "sizes", 0, "shm_bytes_per_slot") if d.get("sizes") else None,
        "B",
        "<= 64 B",
    ),
    (
        "flowtable_scale",
        "worker restart at the largest size",
        lambda d: d["sizes"][-1].get("attach_router_ms") if d.get("sizes") else None,
        "ms",
        "",
    ),
    (
        "router_junk",
        "router: worst junk datagram / forwarded (in process)",
        lambda d: _get(d, "worst_after_window", "over_forwarded"),
        "x",
        "",
    ),
    (
        "flood",
        "junk datagrams/s every attack held (0 loss, new calls in)",
        lambda d: _get(d, "headline", "datagram_rate_held_by_all"),
        "/s",
        "",
    ),
    (
        "flood",
        "relay CPU per attack datagram / forwarded, worst attack",
        lambda d: _get(d, "headline", "worst_junk_over_forwarded"),
        "x",
        "<= 1x",
    ),
    (
        "flood",
        "POST flood held, auth on / auth off (per-address limit)",
        lambda d: _pair(_get(d, "headline"), "post_rate_held_auth_on", "post_rate_held_auth_off"),
        "/s",
        "",
    ),
    (
        "transceiver_capacity",
        "sessions/core at < 0.1% loss, through relay (measured)",
        lambda d: _get(d, "headline", "relay", "measured_sessions"),
        "sessions",
        ">= 500",
    ),
    (
        "transceiver_capacity",
        "sessions/core by transceiver CPU, through relay (extrapolated)",
        lambda d: _get(d, "headline", "relay", "extrapolated_sessions_per_core"),
        "sessions",
        ">= 500",
    ),
    (
        "transceiver_capacity",
        "DTLS handshakes per second through relay",
        lambda d: _get(d, "headline", "relay", "handshakes_per_s"),
        "/s",
        "",
    ),
    (
        "session_setup",
        "offer to first echoed audio p50, through relay",
        lambda d: _get(d, "summary", "relay_p50_ms"),
        "ms",
        "<= 100 ms",
    ),
    (
        "session_setup",
        "offer to first echoed audio p99, through relay",
        lambda d: _get(d, "summary", "relay_p99_ms"),
        "ms",
        "<= 100 ms",
    ),
    (
        "peer_aiortc",
        "transceiver / aiortc calls a core (by CPU per call)",
        lambda d: _get(d, "summary", "extrapolated_ratio"),
        "x",
        ">= 10x",
    ),
    (
        "peer_aiortc",
        "calls at < 0.1% loss, measured: transceiver / aiortc",
        lambda d: _pair(_get(d, "summary"), "transceiver", "aiortc", "measured_calls"),
        "calls",
        "",
    ),
    (
        "peer_aiortc",
        "offer to first echoed audio p50: transceiver / aiortc",
        lambda d: _pair(_get(d, "summary"), "transceiver", "aiortc", "setup_echo_p50_ms"),
        "ms",
        "",
    ),
    (
        "recovery",
        "worker kill -9: media gap max",
        lambda d: _scenario(d, "worker kill -9: its flows", "gap_max_ms"),
        "ms",
        "<= 100 ms",
    ),
    (
        "recovery",
        "relayctl restart with Redis: media gap max",
        lambda d: _scenario(d, "relayctl restart (redis)", "gap_max_ms"),
        "ms",
        "<= 250 ms",
    ),
    (
        "recovery",
        "relayctl stop + start with Redis: media gap max",
        lambda d: _scenario(d, "relayctl stop+start (redis)", "gap_max_ms"),
        "ms",
        "",
    ),
    (
        "voice_latency",
        "endpointing after speech ends, max (real call)",
        lambda d: _get(d, "summary", "endpointing_ms_b_max"),
        "ms",
        "<= 250 ms",
    ),
    (
        "voice_latency",
        "voice-to-voice share beside endpointing, max (real call)",
        lambda d: _get(d, "summary", "other_ms_b_max"),
        "ms",
        "<= 60 ms",
    ),
    (
        "voice_latency",
        "barge-in: first speech frame to last agent packet, max",
        lambda d: _get(d, "summary", "barge_in_ms_max"),
        "ms",
        "<= 100 ms",
    ),
    (
        "agent_capacity",
        "agent calls at < 0.1% late frames, 0 loss (measured)",
        lambda d: _get(d, "headline", "measured_calls"),
        "calls",
        ">= 200",
    ),
    (
        "agent_capacity",
        "agent calls per core by transceiver CPU (extrapolated)",
        lambda d: _get(d, "headline", "extrapolated_calls_per_core"),
        "calls",
        ">= 200",
    ),
)


def _size_ratio(doc: dict[str, Any], key: str) -> float | None:
    sizes = doc.get("sizes") or []
    if len(sizes) < 2 or not sizes[0].get(key):
        return None
    return sizes[-1][key] / sizes[0][key]


def _pair(doc: Any, a: str, b: str, key: str | None = None) -> str | None:
    """'A / B' of two peers' figures (`doc[a]`, or `doc[a][key]`), '-' for a missing one."""
    if not isinstance(doc, dict):
        return None
    values = [_get(doc, name, key) if key else doc.get(name) for name in (a, b)]
    if all(v is None for v in values):
        return None
    return " / ".join(_short(v) for v in values)


def _short(value: Any) -> str:
    """A figure for a pair: '-' if missing, whole above 100, one decimal below."""
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.0f}" if isinstance(value, int) or value >= 100 else f"{value:.1f}"


def _scenario(doc: dict[str, Any], name: str, key: str) -> Any:
    for row in doc.get("scenarios", []):
        if row.get("scenario", "").strip() == name:
            return row.get(key)
    return None


def run(name: str, quick: bool) -> float:
    """Run one benchmark script; returns its wall time. Its output goes straight through."""
    print(f"\n=== {name} " + "=" * (70 - len(name)), flush=True)
    started = time.monotonic()
    cmd = [sys.executable, str(harness.BENCH / f"{name}.py"), *(["--quick"] if quick else [])]
    result = subprocess.run(cmd, cwd=harness.ROOT)
    if result.returncode != 0:
        print(f"{name} failed with exit code {result.returncode}", flush=True)
    return time.monotonic() - started


def summary() -> str:
    rows = []
    for name, what, read, unit, budget in HEADLINES:
        path = harness.RESULTS / f"{name}.json"
        value = read(json.loads(path.read_text())) if path.exists() else None
        rows.append([name, what, "-" if value is None else value, unit, budget or "-"])
    return harness.table(
        "headline figures (bench/README.md explains each)",
        ["benchmark", "figure", "value", "unit", "budget"],
        rows,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (figures are rougher)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run just these")
    args = p.parse_args()
    print(harness.machine_line(harness.machine()), flush=True)
    harness.build_c()
    took = {name: run(name, args.quick) for name in (args.only or BENCHMARKS)}
    print("\n" + summary())
    print("\n" + ", ".join(f"{n} {s:.0f} s" for n, s in took.items()))


if __name__ == "__main__":
    main()
