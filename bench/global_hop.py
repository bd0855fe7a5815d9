"""What one global hop costs: latency and relay CPU of edge relay -> home relay against one relay.

    .venv/bin/python bench/global_hop.py [--quick] [--seconds S] [--rate PPS]

Two paths around one C echo (the sink, standing in for a transceiver), driven by the C load
generator, on loopback:
- `relay`: generator -> relay (cluster 0, one worker) -> sink, and back: one forward each way.
- `hop`: generator -> edge relay (cluster 1, `--cluster-routes 0=<home>`) -> home relay
  (cluster 0) -> sink, and back: the token names cluster 0, so the edge forwards it, enveloped,
  to the home relay's public port; every packet crosses one relay more each way.
Latency: one request outstanding (ping-pong); the hop adds one relay crossing each way, so its
added latency is half the added round trip. CPU: a fixed offered rate; the relay workers'
CPU microseconds per packet generated (both directions), the hop's added CPU against the single
relay's. Budgets (issue 13): added p50 <= 50 us per hop, added CPU <= 1.2x one forward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import harness
import paths

from tests.support.procs import RelayProcess

LATENCY_BUDGET_US = 50.0
CPU_BUDGET_RATIO = 1.2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--rate", type=float, default=20000.0, help="offered packets/s (CPU run)")
    p.add_argument("--sockets", type=int, default=16, help="generator sockets (flows)")
    p.add_argument("--payload", type=int, default=160, help="datagram bytes")
    p.add_argument("--quick", action="store_true", help="1.5 s per measurement")
    args = p.parse_args()
    if args.quick:
        args.seconds = 1.5
    return args


def _pin_relay(proc: RelayProcess, core: int, driver: int) -> list[int]:
    status = proc.status()
    harness.pin(status["pid"], driver)
    pids = [w["pid"] for w in status["workers"]]
    for pid in pids:
        harness.pin(pid, core)
    return pids


@contextlib.contextmanager
def hop_path(sink_port: int, core: int, driver: int, sockets: int) -> Iterator[paths.BenchPath]:
    """Edge relay (cluster 1) routing cluster 0 to the home relay (cluster 0) in front of the
    sink; both one worker on `core`, sharing one secret."""
    with tempfile.TemporaryDirectory(prefix="vr-bench-hop-") as tmp:
        home = RelayProcess(
            Path(tmp) / "home", workers=1, extra=["--no-pin", "--hop-peers", "127.0.0.0/8"]
        )
        home.state_dir.mkdir()
        edge: RelayProcess | None = None
        try:
            home.start()
            edge = RelayProcess(
                Path(tmp) / "edge",
                workers=1,
                extra=[
                    "--no-pin",
                    "--cluster-id",
                    "1",
                    "--secret-file",
                    str(home.secret_file),
                    "--cluster-routes",
                    f"0=127.0.0.1:{home.port}",
                ],
            )
            edge.state_dir.mkdir()
            edge.start()
            pids = _pin_relay(home, core, driver) + _pin_relay(edge, core, driver)
            first = Path(tmp) / "first-packets"
            paths.write_first_packets(first, home.secret_file, ("127.0.0.1", sink_port), sockets)
            yield paths.BenchPath("hop", edge.port, pids, str(first))
        finally:
            if edge is not None:
                edge.cleanup()
            home.cleanup()


def measure(binaries, path, driver, args) -> dict:
    ping = paths.ping(binaries, path, driver, seconds=args.seconds, payload=args.payload)
    flood = paths.flood(
        binaries,
        path,
        driver,
        rate=args.rate,
        seconds=args.seconds,
        sockets=args.sockets,
        payload=args.payload,
    )
    return {"ping": ping, "flood": flood}


def main() -> None:
    args = parse_args()
    info = harness.machine()
    binaries = harness.build_c()
    driver, under_test = harness.cores()
    harness.pin(os.getpid(), driver)
    runs: dict[str, dict] = {}
    with paths.sink(binaries, driver) as sink_port:
        with paths.relay(sink_port, under_test, driver, args.sockets) as path:
            runs["relay"] = measure(binaries, path, driver, args)
        with hop_path(sink_port, under_test, driver, args.sockets) as path:
            runs["hop"] = measure(binaries, path, driver, args)
    relay, hop = runs["relay"], runs["hop"]
    added_p50 = (hop["ping"]["rtt_p50_us"] - relay["ping"]["rtt_p50_us"]) / 2
    added_p99 = (hop["ping"]["rtt_p99_us"] - relay["ping"]["rtt_p99_us"]) / 2
    one = relay["flood"]["forwarder_cpu_us_per_packet"]
    added_cpu = hop["flood"]["forwarder_cpu_us_per_packet"] - one
    figures = {
        "added_p50_us_per_hop": added_p50,
        "added_p99_us_per_hop": added_p99,
        "relay_cpu_us_per_packet": one,
        "hop_path_cpu_us_per_packet": hop["flood"]["forwarder_cpu_us_per_packet"],
        "hop_added_cpu_us_per_packet": added_cpu,
        "hop_cpu_ratio": added_cpu / one if one else float("nan"),
        "latency_budget_us": LATENCY_BUDGET_US,
        "cpu_budget_ratio": CPU_BUDGET_RATIO,
        "runs": runs,
    }
    rows = [
        [
            name,
            run["ping"]["rtt_p50_us"],
            run["ping"]["rtt_p99_us"],
            run["flood"]["achieved_pps"],
            run["flood"]["forwarder_cpu_us_per_packet"],
        ]
        for name, run in runs.items()
    ]
    headers = ["path", "rtt p50 us", "rtt p99 us", "pps (flood)", "relay cpu us/pkt"]
    summary = [
        ["added p50 per hop (us)", added_p50, f"<= {LATENCY_BUDGET_US}"],
        ["added CPU / one forward", figures["hop_cpu_ratio"], f"<= {CPU_BUDGET_RATIO}"],
    ]
    harness.report(
        "global_hop",
        [
            harness.table("Paths", headers, rows),
            harness.table("One hop", ["figure", "value", "budget"], summary),
        ],
        figures,
        info,
    )


if __name__ == "__main__":
    main()
