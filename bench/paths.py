"""The packet paths the forwarding benchmarks compare, all around one C echo (the sink).

- `direct`: load generator -> sink (a C UDP echo), no forwarder: the machine's floor.
- `c`: load generator -> C recvmmsg/sendmmsg forwarder -> sink -> forwarder -> generator.
- `relay`: load generator -> voicerelay (one worker) -> sink -> relay -> generator. Each
  generator socket first sends a STUN Binding request whose ufrag routes to the sink, and waits
  for its echo, so every later packet is a known flow.
- `relay-kernel`: the same relay started with `--kernel-fast-path` and the same first packets.
  Once a flow carried return traffic its worker hands it to the tc program on `lo` (at its next
  flush, every 100 ms); from then on the kernel forwards the flow's datagrams both ways in
  softirq, on the CPU of whoever sent them (generator or sink): no forwarder process runs.
  Measure only after `wait_offloaded` saw every generator flow in the kernel.

The sink echoes envelopes unchanged, so it stands in for a transceiver at next to no cost. The
forwarder under test runs on one core; generator and sink share the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import random
import re
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import harness

from tests.support.procs import RelayProcess, alive, free_ports, port_free, wait_for
from tests.support.standin import binding_request
from voicerelay.addresses import format_addr
from voicerelay.relay.fastpath.kernel import HANDLE_BASE
from voicerelay.wire.token import load_keys

KERNEL = "relay-kernel"
PATHS = ("direct", "c", "relay", KERNEL)
OFFLOAD_TIMEOUT = 5.0  # s for every generator flow to reach the kernel (it takes <= 0.1 s)
FIRST_PACKET_TIMEOUT = 5.0  # s for a first packet's answer (resent every 0.2 s)
PING_TIMEOUT = 0.1  # s a ping-pong request may take before it counts as lost (as loadgen.c's)
BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


class Meter(Protocol):
    """Something measured between `start()` and `stop()` (harness.CpuMeter, MachineMeter)."""

    def start(self) -> Any: ...
    def stop(self) -> Any: ...


@dataclass
class BenchPath:
    """One path under test: where the generator sends, and whose CPU counts as forwarding."""

    name: str
    port: int
    forwarder_pids: list[int] = field(default_factory=list)
    first_packets: str = "-"  # file of per-socket first packets, or "-"
    relay: RelayProcess | None = None  # the relay of the relay paths
    sink: tuple[str, int] | None = None  # where the relay paths' first packets route
    flows: int = 0  # how many first packets
    sink_pid: int | None = None  # the sink's process (set by `each_path`)

    @property
    def kernel(self) -> bool:
        """True for the relay with the kernel fast path."""
        return self.name == KERNEL


def _wait_udp_bound(port: int) -> None:
    def bound() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    wait_for(bound, 5, 0.01, f"UDP port {port} to be bound")


@contextlib.contextmanager
def sink_process(binaries: dict[str, Path], core: int) -> Iterator[tuple[int, int]]:
    """A C echo on a free port, pinned to `core`; yields (port, pid)."""
    port = free_ports(1)
    with harness.process([binaries["sink"], port], core) as proc:
        _wait_udp_bound(port)
        yield port, proc.pid


@contextlib.contextmanager
def sink(binaries: dict[str, Path], core: int) -> Iterator[int]:
    """A C echo on a free port, pinned to `core`; yields its port."""
    with sink_process(binaries, core) as (port, _):
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


def read_first_packets(path: Path, count: int) -> list[bytes]:
    """The per-socket first packets `write_first_packets` wrote (u16 little-endian length +
    bytes), the first `count` of them."""
    data, out, offset = path.read_bytes(), [], 0
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        out.append(data[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return out


# The relay paths ------------------------------------------------------------------------------
@contextlib.contextmanager
def relay(
    sink_port: int,
    core: int,
    driver_core: int,
    sockets: int,
    workers: int = 1,
    *,
    kernel: bool = False,
) -> Iterator[BenchPath]:
    """A real relay (`relayctl start --workers 1`) whose worker is pinned to `core`; with
    `kernel`, the `relay-kernel` path (`--kernel-fast-path`: RuntimeError if it is off)."""
    with tempfile.TemporaryDirectory(prefix="vr-bench-") as tmp:
        extra = ["--no-pin", *(["--kernel-fast-path"] if kernel else [])]
        ports = {}
        if kernel:  # restarted between runs: its ports must not become someone's ephemeral port
            base = fixed_ports(1 + workers)
            ports = {"port": base, "internal_base": base + 1}
        proc = RelayProcess(Path(tmp), workers=workers, extra=extra, **ports)
        path = BenchPath(KERNEL if kernel else "relay", proc.port, relay=proc)
        path.first_packets = str(Path(tmp) / "first-packets")
        path.sink, path.flows = ("127.0.0.1", sink_port), sockets
        try:
            start_relay(path, core, driver_core)
            yield path
        finally:
            proc.cleanup()


def fixed_ports(count: int) -> int:
    """A base port such that `count` consecutive UDP and TCP ports are free, below the
    kernel's ephemeral range (a port left free between runs is not handed to a socket that
    binds port 0 meanwhile)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(500):
        base = random.randrange(10000, max(10001, low - count))
        if all(
            port_free(socket.SOCK_DGRAM, base + i) and port_free(socket.SOCK_STREAM, base + i)
            for i in range(count)
        ):
            return base
    raise RuntimeError(f"no {count} free ports below {low}")


def start_relay(path: BenchPath, core: int, driver_core: int) -> None:
    """(Re)start the path's relay on its port and state directory: launcher on
    `driver_core`, workers on `core`; `path.forwarder_pids` becomes the workers', and the first
    packets are written anew. The kernel path fails loudly unless the fast path is on."""
    proc = _relay_of(path)
    proc.start()
    status = proc.status()
    if path.kernel and not str(status.get("fast_path", "off")).startswith("on"):
        proc.stop()
        raise RuntimeError(
            f"{KERNEL}: the kernel fast path is {status.get('fast_path')!r}: it needs root, "
            "clang and libbpf-dev"
        )
    harness.pin(status["pid"], driver_core)  # the launcher: snapshots, control, renewals
    pids = [w["pid"] for w in status["workers"]]
    for pid in pids:
        harness.pin(pid, core)
    path.forwarder_pids[:] = pids
    refresh_first_packets(path)


def refresh_first_packets(path: BenchPath) -> None:
    """Write the relay path's first packets anew, with fresh tokens: a token opens a flow only
    for 30 s after it was issued (a known flow takes its STUN whatever the token's age)."""
    if path.relay is not None and path.sink is not None:
        secret = path.relay.secret_file
        write_first_packets(Path(path.first_packets), secret, path.sink, path.flows)


def stop_relay(path: BenchPath, timeout: float = 5.0) -> None:
    """Stop the path's relay and wait until its processes are gone and (kernel path) its tc
    program has left `lo`, so the next path's run pays nothing for it."""
    proc = _relay_of(path)
    pids = [proc.launcher_pid(), *path.forwarder_pids]
    proc.stop()
    for pid in pids:
        wait_for(lambda p=pid: not alive(p), timeout, 0.01, f"relay process {pid} to exit")
    if path.kernel:
        wait_for(lambda: not own_tc_program(path), timeout, 0.01, "the tc program to detach")


def relay_running(path: BenchPath) -> bool:
    """True while the path's relay launcher runs."""
    proc = _relay_of(path)
    with contextlib.suppress(OSError, ValueError):
        return alive(proc.launcher_pid())
    return False


def relay_launcher_pid(path: BenchPath) -> int | None:
    """The pid of the path's relay launcher, if one runs."""
    if path.relay is None or not relay_running(path):
        return None
    return path.relay.launcher_pid()


def relay_diagnosis(path: BenchPath, lines: int = 5) -> str:
    """The relay's workers (state, restarts, last exit) and the end of its log, one line."""
    proc = _relay_of(path)
    try:
        workers = [
            {k: w.get(k) for k in ("pid", "state", "restarts", "last_exit")}
            for w in proc.status()["workers"]
        ]
    except Exception as exc:  # the relay may be gone: say so
        workers = [f"status failed: {exc}"]
    log = proc.state_dir / f"relay-{proc.port}.log"
    tail = log.read_text().splitlines()[-lines:] if log.exists() else []
    return f"workers {workers}; log: {' | '.join(tail)}"


def _relay_of(path: BenchPath) -> RelayProcess:
    if path.relay is None:
        raise ValueError(f"path {path.name} has no relay")
    return path.relay


def lo_tc_filters() -> list[str]:
    """The eBPF filters on `lo` ingress (`tc filter show`), one line each: anything here runs
    for every loopback datagram of every path."""
    out = subprocess.run(
        ["tc", "filter", "show", "dev", "lo", "ingress"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout
    return [line.strip() for line in out.splitlines() if " bpf " in line and "handle" in line]


def own_tc_program(path: BenchPath) -> bool:
    """True while the relay of `path` has its tc program on `lo` (handle: base + port)."""
    return _own_filter(path) is not None


def _own_filter(path: BenchPath) -> str | None:
    handle = f"handle 0x{HANDLE_BASE + path.port:x} "
    return next((line for line in lo_tc_filters() if handle in line), None)


@contextlib.contextmanager
def bpf_run_time() -> Iterator[bool]:
    """Have the kernel time every BPF program's runs while in the block (BPF_ENABLE_STATS
    through libbpf: it stops when the descriptor closes; two clock reads a run). Yields False
    if it refuses."""
    fd = -1
    with contextlib.suppress(OSError, AttributeError):
        enable = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1").bpf_enable_stats
        enable.argtypes, enable.restype = [ctypes.c_int], ctypes.c_int
        fd = enable(BPF_STATS_RUN_TIME)
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def tc_program_run(path: BenchPath) -> tuple[int, int] | None:
    """(nanoseconds, runs) the kernel path's tc program has run so far while `bpf_run_time`
    was on (bpftool), or None if it cannot tell."""
    line = _own_filter(path)
    found = re.search(r" id (\d+)", line or "")
    if found is None:
        return None
    out = subprocess.run(
        ["bpftool", "prog", "show", "id", found.group(1), "--json"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError:
        return None
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def wait_offloaded(
    path: BenchPath,
    clients: Collection[tuple[str, int]],
    timeout: float = OFFLOAD_TIMEOUT,
    *,
    exact: bool = True,
) -> float:
    """Wait until every one of `clients` (the generator's addresses) is in the kernel's flow
    map (the relay's `kernel_flows` control op) and, with `exact`, the relay's `kernel_flows`
    total is their number: every generator flow is forwarded by the kernel. Returns the
    seconds waited; RuntimeError (with what the relay reports) after `timeout`."""
    proc = _relay_of(path)
    wanted = {format_addr(c) for c in clients}
    started = time.monotonic()
    deadline = started + timeout
    while True:
        stats = proc.stats()
        total = stats["totals"].get("kernel_flows", 0)
        missing = wanted - {f["client"] for f in proc.request("kernel_flows").get("flows", [])}
        if not missing and (total == len(wanted) or not exact):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{path.name}: {len(wanted) - len(missing)} of {len(wanted)} generator flows in "
                f"the kernel's map, kernel_flows {total}, after {timeout:g} s (fast path "
                f"{stats.get('fast_path')!r}, flows {stats['totals'].get('flows')}, kernel "
                f"program {stats.get('kernel')}; {relay_diagnosis(path)})"
            )
        time.sleep(0.02)


def relay_counts(path: BenchPath) -> dict[str, int]:
    """What the path's relay forwarded so far, for differences over a run: in userspace (the
    workers' counters less what the kernel forwarded for them) and by the tc program."""
    stats = _relay_of(path).stats()
    totals, program = stats["totals"], stats.get("kernel") or {}
    return {
        "userspace": totals["packets_in"]
        - totals.get("kernel_packets_in", 0)
        + totals["packets_out"]
        - totals.get("kernel_packets_out", 0),
        "kernel": program.get("to_transceiver", 0) + program.get("to_client", 0),
        **{f"kernel_{k}": v for k, v in program.items() if k.startswith(("pass_", "failed"))},
    }


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """`relay_counts` differences."""
    return {k: after[k] - before.get(k, 0) for k in after}


# Load -----------------------------------------------------------------------------------------
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
    """C ping-pong (bench/c/loadgen.c): one request outstanding at a time, round-trip
    percentiles in microseconds. It starts the moment its first packets are answered, so on
    the kernel path its first ~100 ms would go through the worker: use `ping_pong` there."""
    cmd = [binaries["loadgen"], "ping", path.port, 1, 0, seconds, payload, path.first_packets]
    return harness.run_json(cmd, core)


def open_flow(sock: socket.socket, first: bytes, timeout: float = FIRST_PACKET_TIMEOUT) -> None:
    """Send a relay flow's first packet on a connected socket until something answers."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while True:
        sock.send(first)
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            sock.recv(4096)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer to the first packet in {timeout:g} s")


def first_packet(path: BenchPath) -> bytes | None:
    """A first packet for a new flow of this process on `path`: for a relay path a Binding
    request with a fresh token and a ufrag of its own (a token opens flows for 30 s after it
    was issued), else the path's first record, or None."""
    if path.relay is not None and path.sink is not None:
        keys = load_keys(path.relay.secret_file)
        return binding_request(keys, path.sink, f"ping{next(_PING_FLOWS)}")
    if path.first_packets != "-":
        return read_first_packets(Path(path.first_packets), 1)[0]
    return None


_PING_FLOWS = itertools.count()


def ping_pong(
    path: BenchPath, *, seconds: float, payload: int, meters: Sequence[Meter] = ()
) -> dict[str, Any]:
    """One request outstanding at a time from one socket of this process (as loadgen.c's
    `ping`, the same figures): the relay paths' flow opened first, and on the kernel path
    offloaded before the first timed request, so every timed round trip takes the path under
    test. A request unanswered for PING_TIMEOUT s is lost. `meters` run over the timed
    requests only. Relay paths also report where their datagrams were forwarded during the
    run (`forwarded`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.connect(("127.0.0.1", path.port))
        if (first := first_packet(path)) is not None:
            open_flow(sock, first)
        if path.kernel:  # flows of earlier runs may still be there
            wait_offloaded(path, [sock.getsockname()], exact=False)
        before = relay_counts(path) if path.relay else None
        sock.settimeout(PING_TIMEOUT)
        for meter in meters:
            meter.start()
        rtts_ns, sent, elapsed = _ping_loop(sock, seconds, payload)
        for meter in meters:
            meter.stop()
        result = rtt_summary(rtts_ns, sent, elapsed)
        if before is not None:
            time.sleep(0.25)  # the workers publish their counters every 100 ms
            result["forwarded"] = counts_since(before, relay_counts(path))
    return result


def _ping_loop(sock: socket.socket, seconds: float, payload: int) -> tuple[list[int], int, float]:
    """Timed request/echo pairs for `seconds`: (round trips in ns, requests sent, seconds)."""
    body = b"\x55" * max(0, payload - 9)
    rtts: list[int] = []
    clock, send, recv = time.perf_counter_ns, sock.send, sock.recv
    sent = 0
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        end = start + int(seconds * 1e9)
        while clock() < end:
            sent += 1
            request = b"\x80" + sent.to_bytes(8, "little") + body
            t0 = clock()
            send(request)
            with contextlib.suppress(TimeoutError):
                while recv(4096) != request:  # a late echo of an earlier request: skip it
                    pass
                rtts.append(clock() - t0)
        return rtts, sent, (clock() - start) / 1e9
    finally:
        if gc_was_on:
            gc.enable()


def rtt_summary(rtts_ns: Sequence[int], sent: int, seconds: float) -> dict[str, Any]:
    """The ping-pong figures (loadgen.c's keys): sent, received, loss, round-trip
    percentiles in microseconds."""
    ordered = sorted(rtts_ns)
    received = len(ordered)
    return {
        "sent": sent,
        "received": received,
        "loss": 1 - received / sent if sent else float("nan"),
        "seconds": seconds,
        **{
            f"rtt_{name}_us": harness.percentile(ordered, p) / 1e3
            for name, p in (("p50", 50), ("p99", 99), ("p999", 99.9))
        },
        "rtt_max_us": ordered[-1] / 1e3 if ordered else float("nan"),
    }


def each_path(
    sockets: int, names: Sequence[str] = ("direct", "c", "relay")
) -> Iterator[tuple[BenchPath, dict[str, Path], int]]:
    """Set up `names` (of PATHS) in turn around one sink, this process pinned to the driver
    core; yields (path, binaries, driver core) for each, torn down after (so the kernel
    path's tc program is on `lo` only during its own turn)."""
    binaries = harness.build_c()
    driver, under_test = harness.cores()
    harness.pin(os.getpid(), driver)
    with sink_process(binaries, driver) as (sink_port, sink_pid):
        setups = {
            "direct": lambda: direct(sink_port),
            "c": lambda: c_forwarder(binaries, sink_port, under_test),
            "relay": lambda: relay(sink_port, under_test, driver, sockets),
            KERNEL: lambda: relay(sink_port, under_test, driver, sockets, kernel=True),
        }
        for name in names:
            with setups[name]() as path:
                path.sink_pid = sink_pid
                yield path, binaries, driver
