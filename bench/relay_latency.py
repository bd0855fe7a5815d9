"""Latency through the relay against the direct path and the C forwarder, same run.

    .venv/bin/python bench/relay_latency.py [--seconds S]

One request outstanding at a time (ping-pong) from the C load generator through each path to a
C echo. A round trip crosses the forwarder twice (client -> sink and back), so the added
latency per crossing is half the added round trip. Budget (shared/DESIGN.md): relay added
latency over the direct path p50 <= 30 us, p99 <= 150 us.
"""

from __future__ import annotations

import argparse

import harness
import paths

PERCENTILES = ("p50", "p99", "p999")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="ping-pong time per path")
    p.add_argument("--payload", type=int, default=160, help="datagram bytes")
    p.add_argument("--quick", action="store_true", help="1.5 s per path")
    args = p.parse_args()
    if args.quick:
        args.seconds = 1.5
    return args


def main() -> None:
    args = parse_args()
    info = harness.machine()
    runs: dict[str, dict] = {}
    for path, binaries, driver in paths.each_path(1):
        runs[path.name] = paths.ping(
            binaries, path, driver, seconds=args.seconds, payload=args.payload
        )
    base = runs["direct"]
    added = {
        name: {p: run[f"rtt_{p}_us"] - base[f"rtt_{p}_us"] for p in PERCENTILES}
        for name, run in runs.items()
    }
    rows = [
        [
            name,
            run["sent"],
            *(run[f"rtt_{p}_us"] for p in PERCENTILES),
            *(added[name][p] for p in PERCENTILES),
            added[name]["p50"] / 2,
        ]
        for name, run in runs.items()
    ]
    headers = [
        "path",
        "round trips",
        "rtt p50 us",
        "rtt p99 us",
        "rtt p99.9 us",
        "added p50",
        "added p99",
        "added p99.9",
        "added p50 per crossing",
    ]
    relay = added["relay"]
    over_c = {p: relay[p] - added["c"][p] for p in PERCENTILES}
    summary = (
        f"relay added round trip over direct: p50 {relay['p50']:.1f} us (budget 30), "
        f"p99 {relay['p99']:.1f} us (budget 150), p99.9 {relay['p999']:.1f} us\n"
        f"relay added round trip over the C forwarder: p50 {over_c['p50']:.1f} us, "
        f"p99 {over_c['p99']:.1f} us, p99.9 {over_c['p999']:.1f} us"
    )
    figures = {
        "parameters": vars(args),
        "paths": runs,
        "added_us": added,
        "relay_over_c_us": over_c,
        "budget_added_us": {"p50": 30, "p99": 150},
    }
    title = f"ping-pong, one request outstanding, {args.payload} B, {args.seconds:.0f} s per path"
    harness.report("relay_latency", [harness.table(title, headers, rows), summary], figures, info)


if __name__ == "__main__":
    main()
