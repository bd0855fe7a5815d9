"""Relay forwarding cost against the C recvmmsg/sendmmsg floor, same load, same run.

    .venv/bin/python bench/relay_forwarding.py [--quick]

Per path (direct, C forwarder, voicerelay with one worker): CPU microseconds per forwarded
packet at a fixed sub-saturation rate, then a rate ramp for the most packets/s one worker
forwards with < 1 % loss. A forwarded packet is one datagram moved one way: a round trip
through the relay is two. Budget (shared/DESIGN.md): relay <= 1.3x the C forwarder.
"""

from __future__ import annotations

import argparse

import harness
import paths

LOSS_LIMIT = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=10000, help="fixed rate, packets/s each way")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    p.add_argument("--sockets", type=int, default=64, help="client sockets (flows)")
    p.add_argument("--payload", type=int, default=160, help="datagram bytes (Opus+SRTP ~160)")
    p.add_argument(
        "--ramp",
        default="10000,20000,40000,60000,80000,100000,140000,200000",
        help="offered rates for the max-throughput search, packets/s each way",
    )
    p.add_argument("--quick", action="store_true", help="short runs, short ramp")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.ramp = 1.5, "10000,40000,80000"
    return args


def max_rate(binaries, path, driver, args) -> tuple[float, list[dict]]:
    """Highest offered rate forwarded with loss under LOSS_LIMIT (stops at the first failure)."""
    best, steps = 0.0, []
    for rate in (float(r) for r in args.ramp.split(",")):
        run = paths.flood(
            binaries,
            path,
            driver,
            rate=rate,
            seconds=args.seconds,
            sockets=args.sockets,
            payload=args.payload,
        )
        steps.append(run)
        if run["loss"] >= LOSS_LIMIT:
            break
        best = run["achieved_pps"]
    return best, steps


def main() -> None:
    args = parse_args()
    info = harness.machine()
    results: dict[str, dict] = {}
    for path, binaries, driver in paths.each_path(args.sockets):
        fixed = paths.flood(
            binaries,
            path,
            driver,
            rate=args.rate,
            seconds=args.seconds,
            sockets=args.sockets,
            payload=args.payload,
        )
        best, steps = max_rate(binaries, path, driver, args)
        results[path.name] = {"fixed": fixed, "max_pps_each_way": best, "ramp": steps}
    c_cost = results["c"]["fixed"]["forwarder_cpu_us_per_packet"]
    relay_cost = results["relay"]["fixed"]["forwarder_cpu_us_per_packet"]
    rows = [
        [
            name,
            r["fixed"]["forwarder_cpu_us_per_packet"],
            r["fixed"]["forwarder_util"] * 100,
            r["fixed"]["loss"] * 100,
            r["fixed"]["generator_cpu_us_per_packet"],
            r["max_pps_each_way"],
        ]
        for name, r in results.items()
    ]
    ratio = relay_cost / c_cost if c_cost else float("nan")
    figures = {
        "parameters": vars(args),
        "paths": results,
        "relay_cpu_us_per_packet": relay_cost,
        "c_cpu_us_per_packet": c_cost,
        "relay_over_c": ratio,
        "relay_max_pps_per_worker_each_way": results["relay"]["max_pps_each_way"],
        "budget_relay_over_c": 1.3,
    }
    title = (
        f"forwarding at {args.rate:,.0f} packets/s each way, {args.sockets} flows, "
        f"{args.payload} B; max rate with loss < {LOSS_LIMIT:.0%}"
    )
    headers = ["path", "cpu us/pkt", "cpu %", "loss %", "gen us/pkt", "max pps each way"]
    summary = f"relay / C per packet: {ratio:.2f}x (budget 1.3x)"
    harness.report(
        "relay_forwarding", [harness.table(title, headers, rows), summary], figures, info
    )


if __name__ == "__main__":
    main()
