"""What every benchmark shares: the machine it ran on, the C floor binaries, core pinning,
CPU accounting of other processes, result files and tables.

Benchmarks print figures and ratios against a baseline measured in the same run; they never
pass or fail. Each script writes `bench/results/<name>.json` with the machine stamped in it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
C_PROGRAMS = ("forwarder", "loadgen", "sink")

if str(ROOT) not in sys.path:  # scripts run as `python bench/x.py`; tests.support lives at root
    sys.path.insert(0, str(ROOT))


# The machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg()[0],
    }


def cores() -> tuple[int, int]:
    """Two distinct cores: (driver core, core under test). One core machines share it."""
    usable = sorted(os.sched_getaffinity(0))
    return usable[0], usable[-1]


def pin(pid: int, core: int) -> None:
    """Pin a process (and its threads) to one core."""
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).cpu_affinity([core])
        for thread in psutil.Process(pid).threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, {core})


# C floor binaries ------------------------------------------------------------------------------
def build_c() -> dict[str, Path]:
    """Compile bench/c/*.c with the system C compiler (once per source change)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: no C compiler: install gcc (Debian: apt-get install gcc)")
    BUILD.mkdir(parents=True, exist_ok=True)
    binaries = {}
    for name in C_PROGRAMS:
        src, out = BENCH / "c" / f"{name}.c", BUILD / name
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src)], check=True)
        binaries[name] = out
    return binaries


# Processes and CPU accounting -----------------------------------------------------------------
def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds consumed so far by these processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


class CpuMeter:
    """CPU seconds a set of processes spends between `start()` and `stop()`."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.cpu = self.wall = 0.0

    def start(self) -> CpuMeter:
        self._cpu0, self._wall0 = cpu_seconds(self.pids), time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.cpu = cpu_seconds(self.pids) - self._cpu0
        self.wall = time.monotonic() - self._wall0
        return self

    @property
    def utilisation(self) -> float:
        """Fraction of one core used."""
        return self.cpu / self.wall if self.wall else 0.0


def _machine_sample() -> tuple[float, float]:
    """(busy fields, not running) CPU seconds so far, summed over every core: busy fields =
    user + nice + system + irq + softirq, not running = idle + iowait + steal."""
    busy = absent = 0.0
    for t in psutil.cpu_times(percpu=True):
        busy += t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        absent += t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    return busy, absent


class MachineMeter:
    """CPU seconds the whole machine was busy between `start()` and `stop()`, every core and
    whoever ran (softirq work included: it counts wherever it ran, not in any process).

    `busy` is wall time x cores minus idle, iowait and steal (/proc/stat via psutil): the
    kernel times idle periods exactly (NO_HZ), to 10 ms a core after rounding. `busy_ticks`
    sums the busy fields instead (user + nice + system + irq + softirq, as
    loadclient.CoreMeter does); with tick-based CPU accounting each scheduler tick charges a
    whole tick to whatever runs, and a tick soon after a wake-up tends to find the CPU busy, so
    short bursts are over-counted, by how much depends on the wake-up pattern: kept as a
    cross-check only."""

    def __init__(self) -> None:
        self.busy = self.busy_ticks = self.wall = 0.0
        self.cores = len(psutil.cpu_times(percpu=True))

    def start(self) -> MachineMeter:
        self._ticks0, self._absent0 = _machine_sample()
        self._wall0 = time.monotonic()
        return self

    def stop(self) -> MachineMeter:
        ticks, absent = _machine_sample()
        self.wall = time.monotonic() - self._wall0
        self.busy_ticks = ticks - self._ticks0
        self.busy = self.cores * self.wall - (absent - self._absent0)
        return self


def run_ns_by_pid() -> dict[int, int]:
    """Nanoseconds every process on the machine has run so far (all its threads; schedstat)."""
    out: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(stat.split("/")[2])
            out[pid] = out.get(pid, 0) + int(Path(stat).read_text().split()[0])
    return out


class OthersMeter:
    """CPU seconds the processes alive at `stop()` and not in `own` ran since `start()`
    (schedstat run time, ns; a process that exited meanwhile is not seen). Idle-loop overhead
    is not in it."""

    def __init__(self, own: Iterable[int]) -> None:
        self.own = set(own)
        self.cpu = self.wall = 0.0

    def start(self) -> OthersMeter:
        self._ns0, self._wall0 = run_ns_by_pid(), time.monotonic()
        return self

    def stop(self) -> OthersMeter:
        ns = run_ns_by_pid()
        self.wall = time.monotonic() - self._wall0
        ran = sum(n - self._ns0.get(pid, 0) for pid, n in ns.items() if pid not in self.own)
        self.cpu = max(0, ran) / 1e9
        return self

    @property
    def cores(self) -> float:
        """Cores' worth of CPU others used on average."""
        return self.cpu / self.wall if self.wall else 0.0


@contextlib.contextmanager
def process(
    cmd: Sequence[str], core: int | None = None, **popen: Any
) -> Iterator[subprocess.Popen]:
    """Run a helper process for the duration of a block; stop it (TERM, then KILL) after."""
    proc = subprocess.Popen([str(c) for c in cmd], **popen)
    try:
        if core is not None:
            pin(proc.pid, core)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)


def run_json(cmd: Sequence[str], core: int | None = None, timeout: float = 120) -> dict[str, Any]:
    """Run a program that prints one JSON line (the C load generator) and parse it."""
    with process(cmd, core, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


# Statistics ------------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


# Output ----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cores']} cores ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}, load {info['loadavg_at_start']:.2f}"
    )


def write_result(name: str, figures: dict[str, Any], info: dict[str, Any]) -> Path:
    """Save a benchmark's figures as bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info}
    doc.update(figures)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def report(name: str, tables: Sequence[str], figures: dict[str, Any], info: dict[str, Any]) -> None:
    """Print the machine line and tables, then write the JSON."""
    print(machine_line(info))
    for t in tables:
        print()
        print(t)
    path = write_result(name, figures, info)
    print(f"\nwrote {path.relative_to(ROOT)}")
