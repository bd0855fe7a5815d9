"""The three packet paths the forwarding benchmarks compare, all driven by the C load generator.

- `direct`: load generator -> sink (a C UDP echo), no forwarder: the machine's floor.
- `c`: load generator -> C recvmmsg/sendmmsg forwarder -> sink -> forwarder -> generator.
- `relay`: load generator -> voicerelay (one worker) -> sink -> relay -> generator. Each
  generator socket first sends a STUN Binding request whose ufrag routes to the sink, and waits
  for its echo, so every later packet is a known flow.

The sink echoes envelopes unchanged, so it stands in for a transceiver at next to no cost. The
forwarder under test runs on one core; generator and sink share the other.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import harness

from tests.support.procs import RelayProcess, free_ports, wait_for
from tests.support.standin import binding_request
from voicerelay.wire.token import load_keys


@dataclass
class BenchPath:
    """One path under test: where the generator sends, and whose CPU counts as forwarding."""

    name: str
    port: int
    forwarder_pids: list[int] = field(default_factory=list)
    first_packets: str = "-"  # file of per-socket first packets, or "-"


def _wait_udp_bound(port: int) -> None:
    def bound() -> bool:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    wait_for(bound, 5, 0.01, f"UDP port {port} to be bound")


@contextlib.contextmanager
def sink(binaries: dict[str, Path], core: int) -> Iterator[int]:
    """A C echo on a free port, pinned to `core`; yields its port."""
    port = free_ports(1)
    with harness.process([binaries["sink"], port], core):
        _wait_udp_bound(port)
        yield port


@contextlib.contextmanager
def direct(sink_port: int) -> Iterator[BenchPath]:
    yield BenchPath("direct", sink_port)


@contextlib.contextmanager
def c_forwarder(binaries: dict[str, Path], sink_port: int, core: int) -> Iterator[BenchPath]:
    """The C recvmmsg/sendmmsg forwarder in front of the sink."""
    public, internal = free_ports(1), free_ports(1)
    cmd = [binaries["forwarder"], public, internal, sink_port]
    with harness.process(cmd, core, stderr=subprocess.DEVNULL) as proc:
        _wait_udp_bound(public)
        yield BenchPath("c", public, [proc.pid])


def write_first_packets(path: Path, secret: Path, transceiver: tuple[str, int], n: int) -> None:
    """One STUN Binding request per generator socket, each routing to `transceiver`."""
    keys = load_keys(secret)
    with open(path, "wb") as f:
        for i in range(n):
            pkt = binding_request(keys, transceiver, f"bench{i}")
            f.write(struct.pack("<H", len(pkt)) + pkt)


@contextlib.contextmanager
def relay(
    sink_port: int, core: int, driver_core: int, sockets: int, workers: int = 1
) -> Iterator[BenchPath]:
    """A real relay (`relayctl start --workers 1`) whose worker is pinned to `core`."""
    with tempfile.TemporaryDirectory(prefix="vr-bench-") as tmp:
        proc = RelayProcess(Path(tmp), workers=workers, extra=["--no-pin"])
        try:
            proc.start()
            status = proc.status()
            harness.pin(status["pid"], driver_core)  # the launcher: snapshots, control
            pids = [w["pid"] for w in status["workers"]]
            for pid in pids:
                harness.pin(pid, core)
            first = Path(tmp) / "first-packets"
            write_first_packets(first, proc.secret_file, ("127.0.0.1", sink_port), sockets)
            yield BenchPath("relay", proc.port, pids, str(first))
        finally:
            proc.cleanup()


def flood(
    binaries: dict[str, Path],
    path: BenchPath,
    core: int,
    *,
    rate: float,
    seconds: float,
    sockets: int,
    payload: int,
) -> dict:
    """Offer `rate` packets/s for `seconds`; returns the generator's figures plus the
    forwarder's CPU microseconds per forwarded packet (both directions count)."""
    meter = harness.CpuMeter(path.forwarder_pids).start()
    cmd = [binaries["loadgen"], "flood", path.port, sockets, rate, seconds, payload]
    result = harness.run_json([*cmd, path.first_packets], core)
    meter.stop()
    forwarded = result["sent"] + result["received"]
    result["forwarder_cpu_s"] = meter.cpu
    result["forwarder_util"] = meter.utilisation
    result["forwarder_cpu_us_per_packet"] = (
        meter.cpu * 1e6 / forwarded if path.forwarder_pids and forwarded else float("nan")
    )
    result["offered_pps"] = rate
    result["achieved_pps"] = result["received"] / max(result["seconds"], 1e-9)
    return result


def ping(
    binaries: dict[str, Path], path: BenchPath, core: int, *, seconds: float, payload: int
) -> dict:
    """One request outstanding at a time: round-trip percentiles in microseconds."""
    cmd = [binaries["loadgen"], "ping", path.port, 1, 0, seconds, payload, path.first_packets]
    return harness.run_json(cmd, core)


def each_path(sockets: int) -> Iterator[tuple[BenchPath, dict[str, Path], int]]:
    """Set up direct, C forwarder and relay in turn around one sink, this process pinned to
    the driver core; yields (path, binaries, driver core) for each, torn down after."""
    binaries = harness.build_c()
    driver, under_test = harness.cores()
    harness.pin(os.getpid(), driver)
    with sink(binaries, driver) as sink_port:
        setups = (
            lambda: direct(sink_port),
            lambda: c_forwarder(binaries, sink_port, under_test),
            lambda: relay(sink_port, under_test, driver, sockets),
        )
        for setup in setups:
            with setup() as path:
                yield path, binaries, driver
