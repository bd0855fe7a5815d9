"""Latency through the relay (userspace and kernel fast path) against the direct path and the
C forwarder, same run.

    .venv/bin/python bench/relay_latency.py [--seconds S] [--quick] [--paths ...]

One request outstanding at a time (ping-pong) from one socket of this process through each
path to a C echo (`paths.ping_pong`: the same figures as loadgen.c's `ping`, 1-2 us more
round trip on every path alike; unlike it, it opens the relay's flow first and, on the kernel
path, waits until the flow is in the kernel, so every timed round trip takes the path under
test). Paths run one after another, each torn down before the next (the kernel path's tc
program is on `lo` only during its own turn). A round trip crosses the forwarder twice (client
-> sink and back), so the added latency per crossing is half the added round trip.

Budgets: relay added latency over the direct path p50 <= 30 us, p99 <= 150 us
(shared/DESIGN.md); with the kernel fast path, the latency the relay adds over direct <= the C
forwarder's (issue 14), at p50, p99 and p99.9.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import harness
import paths
from peer_coturn import CONTENDED, RunTimeMeter, softirq_threads, wait_quiet

PERCENTILES = ("p50", "p99", "p999")
LABELS = {"p50": "p50", "p99": "p99", "p999": "p99.9"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="ping-pong time per path")
    p.add_argument("--payload", type=int, default=160, help="datagram bytes")
    p.add_argument("--quick", action="store_true", help="1.5 s per path")
    p.add_argument(
        "--paths", default=",".join(paths.PATHS), help=f"subset of {','.join(paths.PATHS)}"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="seconds a path may wait for other processes to leave our cores [15; --quick: 5]",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="reruns of a path while other processes kept >= 10%% of a core busy [2; --quick: 1]",
    )
    args = p.parse_args()
    if args.quick:
        args.seconds = 1.5
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 15.0
    if args.retries is None:
        args.retries = 1 if args.quick else 2
    args.paths = [n for n in args.paths.split(",") if n]
    unknown = set(args.paths) - set(paths.PATHS)
    if unknown or "direct" not in args.paths:
        p.error(f"paths must include direct, from {','.join(paths.PATHS)}")
    return args


def added_over(runs: dict[str, dict], base: str) -> dict[str, dict[str, float]]:
    """Each path's round-trip percentiles minus the `base` path's, in microseconds."""
    ref = runs[base]
    return {
        name: {p: run[f"rtt_{p}_us"] - ref[f"rtt_{p}_us"] for p in PERCENTILES}
        for name, run in runs.items()
    }


def kernel_budget(added: dict[str, dict[str, float]]) -> tuple[bool, str] | None:
    """Issue 14: the kernel path's added latency over direct <= the C forwarder's, at every
    percentile. (met, line), or None without both paths."""
    if paths.KERNEL not in added or "c" not in added:
        return None
    kernel, c = added[paths.KERNEL], added["c"]
    verdicts = {p: kernel[p] <= c[p] for p in PERCENTILES}
    detail = ", ".join(
        f"{LABELS[p]} {kernel[p] / 2:+.1f} vs {c[p] / 2:+.1f} us "
        f"({'PASS' if verdicts[p] else 'MISS'})"
        for p in PERCENTILES
    )
    met = all(verdicts.values())
    return met, (
        f"kernel path added latency <= the C forwarder's (per crossing, over direct): "
        f"{'PASS' if met else 'MISS'}: {detail}"
    )


def kernel_share(run: dict[str, Any]) -> str:
    """The share of a relay path's datagrams the kernel forwarded during the run ('' for the
    other paths)."""
    counts = run.get("forwarded")
    if not counts:
        return ""
    total = counts["kernel"] + counts["userspace"]
    return f"{counts['kernel'] / total:.1%}" if total else "none"


def measure(path: paths.BenchPath, args: argparse.Namespace) -> dict[str, Any]:
    """One ping-pong run on `path` after waiting for quiet; with the cores' worth of CPU other
    live processes (not ours, not the softirq threads) ran meanwhile (`others_cores`), and
    what the machine's busy time has beyond ours and theirs (`unaccounted_cores`: processes
    that came and went, the idle loop's overhead of each wake-up)."""
    launcher = paths.relay_launcher_pid(path) if path.relay is not None else None
    own = [os.getpid(), *([path.sink_pid] if path.sink_pid else []), *path.forwarder_pids]
    own += [*([launcher] if launcher else []), *softirq_threads()]
    waited = wait_quiet(harness.cores(), own, args.quiet_wait)
    machine, others, ours = harness.MachineMeter(), harness.OthersMeter(own), RunTimeMeter(own)
    meters = (machine, others, ours)
    run = paths.ping_pong(path, seconds=args.seconds, payload=args.payload, meters=meters)
    run["others_cores"] = others.cores
    run["unaccounted_cores"] = (machine.busy - ours.cpu - others.cpu) / machine.wall
    run["waited_for_quiet_s"] = waited
    run["lo_tc_filters"] = paths.lo_tc_filters()
    return run


def progress_line(path: paths.BenchPath, run: dict[str, Any]) -> str:
    return (
        f"  {path.name:>12}: {run['sent']:,} round trips, p50 {run['rtt_p50_us']:.1f} us, "
        f"p99 {run['rtt_p99_us']:.1f} us, others {run['others_cores']:.0%} of a core"
        + (f", waited {run['waited_for_quiet_s']:.1f} s" if run["waited_for_quiet_s"] > 0.5 else "")
    )


def main() -> None:
    args = parse_args()
    info = harness.machine()
    runs: dict[str, dict] = {}
    disturbed: dict[str, list[dict]] = {}
    for path, _binaries, _driver in paths.each_path(1, args.paths):
        run = measure(path, args)
        for _ in range(args.retries):
            if run["others_cores"] < CONTENDED:
                break
            print(f"{progress_line(path, run)}: others disturbed it, run again", flush=True)
            disturbed.setdefault(path.name, []).append(run)
            run = measure(path, args)
        runs[path.name] = run
        print(progress_line(path, run), flush=True)
    added = added_over(runs, "direct")
    rows = [
        [
            name,
            run["sent"],
            100 * run["loss"],
            *(run[f"rtt_{p}_us"] for p in PERCENTILES),
            *(added[name][p] for p in PERCENTILES),
            kernel_share(run),
            100 * run["others_cores"],
        ]
        for name, run in runs.items()
    ]
    headers = [
        "path",
        "round trips",
        "loss %",
        "rtt p50 us",
        "rtt p99 us",
        "rtt p99.9 us",
        "added p50",
        "added p99",
        "added p99.9",
        "in kernel",
        "others %",
    ]
    title = (
        f"ping-pong, one request outstanding, {args.payload} B, {args.seconds:g} s per path "
        "(round trips, us)"
    )
    forwarders = [n for n in ("c", "relay", paths.KERNEL) if n in runs]
    crossing = harness.table(
        "added latency per crossing over direct, us (half the added round trip)",
        ["path", *(LABELS[p] for p in PERCENTILES)],
        [[n, *(added[n][p] / 2 for p in PERCENTILES)] for n in forwarders],
    )
    summary = summary_lines(added)
    budget = kernel_budget(added)
    figures = {
        "parameters": vars(args),
        "paths": runs,
        "added_us": added,
        "added_per_crossing_us": {n: {p: added[n][p] / 2 for p in PERCENTILES} for n in added},
        "relay_over_c_us": over(added, "relay", "c"),
        "relay_kernel_over_c_us": over(added, paths.KERNEL, "c"),
        "kernel_budget_met": budget[0] if budget else None,
        "disturbed_runs_repeated": disturbed,
        "budget_added_us": {"p50": 30, "p99": 150},
    }
    tables = [harness.table(title, headers, rows), crossing, "\n".join(summary)]
    harness.report("relay_latency", tables, figures, info)


def over(added: dict[str, dict[str, float]], name: str, base: str) -> dict[str, float] | None:
    """`name`'s added round trip minus `base`'s, per percentile (None without both)."""
    if name not in added or base not in added:
        return None
    return {p: added[name][p] - added[base][p] for p in PERCENTILES}


def summary_lines(added: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    if "relay" in added:
        relay = added["relay"]
        lines.append(
            f"relay added round trip over direct: p50 {relay['p50']:.1f} us (budget 30), "
            f"p99 {relay['p99']:.1f} us (budget 150), p99.9 {relay['p999']:.1f} us"
        )
    for name in ("relay", paths.KERNEL):
        diff = over(added, name, "c")
        if diff is not None:
            lines.append(
                f"{name} added round trip over the C forwarder: "
                + ", ".join(f"{LABELS[p]} {diff[p]:+.1f} us" for p in PERCENTILES)
            )
    budget = kernel_budget(added)
    if budget is not None:
        lines.append(budget[1])
    return lines


if __name__ == "__main__":
    main()
