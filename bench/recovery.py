"""Recovery: the media gap a client sees when a relay worker is killed, when the whole relay is
restarted (`relayctl stop` + `relayctl start`, Redis or file snapshots), and when every relay
process is killed -9 and started again.

Real processes on loopback: a 2-worker relay (`RelayProcess`), a real `redis-server`, a stand-in
transceiver that echoes envelopes (`StandIn`), and a fleet of client sockets streaming 50
packets/s each way. The relay only moves bytes, so stand-in flows see exactly what media sees.
Optionally one real WebRTC call (`ClientCall` through a real transceiver) rides along the Redis
relay to show a DTLS/SRTP session survives without a new offer or ICE restart.

A flow's gap is the longest interval between consecutive echoes from just before the event
until every flow is flowing again (silence until the end of the window counts).

Run: `.venv/bin/python bench/recovery.py [--repeat 5] [--flows 24] [--no-call]`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import harness
import psutil

from tests.support.procs import (
    RedisServer,
    RelayProcess,
    TransceiverProcess,
    alive,
    wait_for,
)
from tests.support.standin import StandIn, binding_request
from voicerelay.wire.addr import Addr
from voicerelay.wire.token import load_keys

INTERVAL = 0.02  # 50 packets/s each way, a 20 ms voice frame
WORKERS = 2
LEAD = 0.1  # the gap window opens this long before the event
SETTLE = 0.3  # keep measuring this long after every flow is back
RECOVER_TIMEOUT = 5.0
REPLACE_TIMEOUT = 1.0  # a killed worker not replaced by then is reported as never replaced
TIME_BUDGET = 115.0  # seconds: later repeats are skipped past this
BUDGET_WORKER_MS = 100.0
BUDGET_RESTART_MS = 250.0


# Client side -----------------------------------------------------------------------------------
class Fleet:
    """Many client flows: one sender thread paces them all, one receiver thread (epoll) stamps
    every echo. Cheaper and steadier than a thread pair per flow."""

    def __init__(self, relay: Addr, count: int, interval: float = INTERVAL) -> None:
        self.relay = relay
        self.interval = interval
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        for s in self.socks:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        self.addrs: list[Addr] = [s.getsockname() for s in self.socks]
        self.arrivals: dict[Addr, list[float]] = {a: [] for a in self.addrs}
        self.seqs: dict[Addr, list[int]] = {a: [] for a in self.addrs}  # echoed, per arrival
        self.sent = 0  # packets with this sequence number or above are not sent yet
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def open(self, keys: Any, transceiver: StandIn, only: list[Addr] | None = None) -> None:
        """Open (or reopen) flows with a sealed STUN Binding request each."""
        wanted = set(only or self.addrs)
        for sock, addr in zip(self.socks, self.addrs, strict=True):
            if addr in wanted:
                sock.sendto(binding_request(keys, transceiver.addr), self.relay)
        wait_for(lambda: all(transceiver.got(a) for a in wanted), 5, what="flows opened")

    def start(self) -> Fleet:
        self._threads = [
            threading.Thread(target=self._send, name="fleet-send", daemon=True),
            threading.Thread(target=self._receive, name="fleet-recv", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            packet = b"\x80" + n.to_bytes(4, "big")
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.sendto(packet, self.relay)
            n += 1
            self.sent = n
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _receive(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock, addr in zip(self.socks, self.addrs, strict=True):
                sel.register(sock, selectors.EVENT_READ, addr)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    self._drain(key.fileobj, key.data)  # type: ignore[arg-type]

    def _drain(self, sock: socket.socket, addr: Addr) -> None:
        while True:
            try:
                data = sock.recv(2048)
            except (BlockingIOError, OSError):
                return
            if data.startswith(b"E\x80") and len(data) >= 6:
                self.seqs[addr].append(int.from_bytes(data[2:6], "big"))
                self.arrivals[addr].append(time.monotonic())

    def missing(self, addr: Addr, start: float, end: float) -> int:
        """Packets never echoed between the first and last echo of [start, end]."""
        times = self.arrivals[addr]
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        seqs = self.seqs[addr][lo:hi]
        return max(seqs) - min(seqs) + 1 - len(set(seqs)) if seqs else 0

    def first_echo(self, addr: Addr, seq: int, start: float) -> float | None:
        """When the first echo of a packet numbered `seq` or later arrived (after `start`)."""
        times, seqs = self.arrivals[addr], self.seqs[addr]
        for i in range(bisect.bisect_left(times, start), len(times)):
            if seqs[i] >= seq:
                return times[i]
        return None

    def flowing(self, since: float) -> list[Addr]:
        """Flows with an echo after `since`."""
        return [a for a in self.addrs if self.arrivals[a] and self.arrivals[a][-1] > since]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for s in self.socks:
            s.close()


class RealCall:
    """One real WebRTC call (`ClientCall`: ICE, DTLS, SRTP) through the relay to a real
    transceiver's echo app, on an event loop thread of its own, sending audio every 20 ms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="call", daemon=True)
        self.call: Any = None
        self.http: Any = None
        self.sender: asyncio.Task | None = None

    def start(self, timeout: float = 15.0) -> RealCall:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(timeout)
        return self

    async def _connect(self) -> None:
        import aiohttp

        from voicerelay.transceiver.certificate import Certificate
        from voicerelay.transceiver.client import ClientCall

        self.http = aiohttp.ClientSession()
        self.call = ClientCall(Certificate.generate())
        await self.call.connect(self.http, self.url)
        await asyncio.wait_for(self.call.secure, 10)
        self.sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        next_at, timestamp = loop.time(), 0
        while True:
            self.call.send_audio(bytes(120), timestamp)
            timestamp += 960
            next_at += INTERVAL
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def arrivals(self) -> list[float]:
        return [t for t, _ in list(self.call.received)] if self.call else []

    def state(self) -> dict[str, Any]:
        """The client session's view: still the first session, never closed?"""
        if self.call is None or self.call.session is None:
            return {"state": None}
        stats = self.call.session.stats
        return {
            "state": stats["state"],
            "closed": self.call.closed.done(),
            "close_reason": stats["close_reason"],
            "received": stats["received"],
            "lost": stats["lost"],
            "rtp_out": stats["rtp_out"],
            "rtp_in": stats["rtp_in"],
            "echoes_timed": len(self.arrivals()),
        }

    def close(self) -> None:
        async def finish() -> None:
            if self.sender is not None:
                self.sender.cancel()
            if self.call is not None:
                self.call.close()
            if self.http is not None:
                await self.http.close()

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(finish(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        with contextlib.suppress(RuntimeError):
            self.loop.close()


# Measuring -------------------------------------------------------------------------------------
@dataclass
class Gap:
    """The longest silence of one flow in a window: its length and where it sat."""

    length: float
    silent_from: float
    back_at: float | None  # None: no echo after the silence (the flow did not come back)


def longest_gap(times: list[float], start: float, end: float) -> Gap:
    """Longest interval between echoes in [start, end]; silence up to `end` counts."""
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    window = times[lo:hi]
    if not window:
        return Gap(end - start, start, None)
    best = Gap(window[0] - start, start, window[0])
    for a, b in zip(window, window[1:], strict=False):
        if b - a > best.length:
            best = Gap(b - a, a, b)
    if end - window[-1] > best.length:
        best = Gap(end - window[-1], window[-1], None)
    return best


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.002) -> float | None:
    """Monotonic time at which `predicate` first held, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    return None


def wait_all_flowing(fleet: Fleet, since: float, timeout: float = RECOVER_TIMEOUT) -> bool:
    """Wait until every flow has an echo after `since`; then keep streaming SETTLE more."""
    ok = poll(lambda: len(fleet.flowing(since)) == len(fleet.addrs), timeout, 0.01) is not None
    time.sleep(SETTLE)
    return ok


def ensure_flowing(fleet: Fleet, keys: Any, transceiver: StandIn) -> list[Addr]:
    """Before an event: reopen any flow a previous event lost; returns those reopened."""
    time.sleep(0.2)
    dead = [a for a in fleet.addrs if a not in fleet.flowing(time.monotonic() - 0.1)]
    if dead:
        fleet.open(keys, transceiver, only=dead)
        wait_for(lambda: len(fleet.flowing(time.monotonic() - 0.1)) == len(fleet.addrs), 5)
    return dead


def gap_results(
    series: dict[Addr, list[float]], start: float, end: float, t0: float
) -> dict[str, list]:
    """Per flow: longest gap, when its silence began and when it ended (ms after `t0`)."""
    gaps = [longest_gap(list(times), start, end) for times in series.values()]
    return {
        "gap_ms": [ms(g.length) for g in gaps],
        "silent_ms": [ms(g.silent_from - t0) for g in gaps],
        "back_ms": [ms(g.back_at - t0) if g.back_at is not None else None for g in gaps],
    }


def flow_results(
    fleet: Fleet, addrs: list[Addr], start: float, end: float, t0: float, seq: int | None = None
) -> dict:
    """`gap_results` of some fleet flows, plus the packets each never got back. With `seq`,
    a flow is back at the first echo of a packet numbered `seq` or later (sent after `t0`)."""
    results = gap_results({a: fleet.arrivals[a] for a in addrs}, start, end, t0)
    results["missing"] = [fleet.missing(a, start, end) for a in addrs]
    if seq is not None:
        back = [fleet.first_echo(a, seq, t0) for a in addrs]
        results["back_ms"] = [ms(b - t0) if b is not None else None for b in back]
    return results


def table_counts(relay: RelayProcess) -> dict[str, Any]:
    """How many entries the shared flow table holds, in all and per shard."""
    stats = relay.stats()
    return {
        "table_flows": stats["table_flows"],
        "per_shard": [w["table_flows"] for w in stats["workers"]],
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# Scenario: one worker killed -9 ---------------------------------------------------------------
def worker_index_of(relay: RelayProcess, worker: Addr) -> int:
    return worker[1] - relay.internal_base


def kill_one_worker(relay: RelayProcess, fleet: Fleet, standin: StandIn, index: int) -> dict:
    """SIGKILL worker `index` mid-stream; time its replacement and every flow's gap."""
    with standin.lock:
        owners = {c: worker_index_of(relay, w) for c, w in standin.workers.items()}
        moves_before = len(standin.moves)
    old_pid = relay.status()["workers"][index]["pid"]
    victim_addr = ("127.0.0.1", relay.internal_base + index)
    seq, killed_at = fleet.sent, time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def replaced() -> bool:
        w = relay.status()["workers"][index]
        return bool(w["alive"] and w["pid"] != old_pid and alive(w["pid"]))

    back_at = poll(replaced, REPLACE_TIMEOUT)
    recovered = wait_all_flowing(fleet, (back_at or killed_at) + 0.05)
    time.sleep(0.2)  # let the restarted worker win back its share of flows
    end = time.monotonic()
    with standin.lock:
        moves = standin.moves[moves_before:]
    serving_at = min((t for t, _, _, new in moves if new == victim_addr), default=None)
    on_victim = [a for a in fleet.addrs if owners.get(a) == index]
    others = [a for a in fleet.addrs if a not in on_victim]
    moved = {c for _, c, _, _ in moves}
    window = (killed_at - LEAD, end, killed_at, seq)
    return {
        "kind": "worker_kill",
        "worker": index,
        "t": killed_at,
        "end": end,
        "down_ms": ms(back_at - killed_at if back_at else None),
        "replaced": back_at is not None,
        "first_forward_by_replacement_ms": ms(serving_at - killed_at if serving_at else None),
        "recovered": recovered,
        "flows_on_killed_worker": len(on_victim),
        "flows_moved_between_workers": len(moved),
        "other_flows_moved": len(moved - set(on_victim)),
        "killed": flow_results(fleet, on_victim, *window),
        "other": flow_results(fleet, others, *window),
        **table_counts(relay),
    }


# Scenario: the whole relay stopped (or killed) and started ------------------------------------
def wait_snapshot(relay: RelayProcess, flows: int) -> None:
    """A crash loses what the last periodic snapshot missed: wait for one holding every flow."""

    def done() -> bool:
        snap = relay.stats()["snapshot"]
        return snap.get("snapshots", 0) >= 1 and (snap.get("flows_in_last_snapshot") or 0) >= flows

    wait_for(done, 5, 0.02, "a snapshot holding every flow")


CLOSE_ERROR = "Cannot close a process while it is still running"
LOG_MARKS = {
    "old_launcher_stopped": " stopped",
    "stale_shm_cleared": "cleared stale shared memory",
    "flows_restored": "restored ",
    "relay_up_logged": "relay up on ",
}


def log_marks(relay: RelayProcess, since_wall: float) -> dict[str, float]:
    """Wall-clock times of the launcher's log lines about a restart, logged after `since_wall`."""
    marks: dict[str, float] = {}
    log = relay.state_dir / f"relay-{relay.port}.log"
    for line in log.read_text(errors="replace").splitlines():
        try:
            wall = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if wall < since_wall - 0.002:
            continue
        for mark, needle in LOG_MARKS.items():
            if needle in line and "voicerelay.launcher" in line:
                marks.setdefault(mark, wall)
    return marks


def started_after(pid: int, since_boot: float) -> float | None:
    """Seconds from `since_boot` (CLOCK_BOOTTIME) to the start of `pid` (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK") - since_boot


def restart_relay(relay: RelayProcess, fleet: Fleet, kind: str) -> dict:
    """`relayctl stop` + `relayctl start` (kind "restart"), `relayctl restart` (kind
    "handover"), or kill -9 of every relay process + `relayctl start` (kind "crash"); the
    relay's ports and state dir stay the same."""
    if kind == "crash":
        wait_snapshot(relay, len(fleet.addrs))
    t0, t0_wall, t0_boot = time.monotonic(), time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)
    if kind == "handover":  # one command: imports done before the old relay stops
        relay.ctl(
            "restart",
            "--internal",
            f"127.0.0.1:{relay.internal_base}",
            "--workers",
            str(relay.workers),
            *relay.extra,
        )
        stopped = up = time.monotonic()
    else:
        if kind == "crash":
            relay.kill_all()
        else:
            relay.stop()
        stopped = time.monotonic()
        relay.start()
        up = time.monotonic()
    restored = relay.status()["restored_flows"]
    recovered = wait_all_flowing(fleet, up)
    end = time.monotonic()
    flows = flow_results(fleet, fleet.addrs, t0 - LEAD, end, t0)
    back = [b for b in flows["back_ms"] if b is not None]
    timeline = {
        "media_silent": ms(harness.percentile([s / 1000 for s in flows["silent_ms"]], 50)),
        "stop_returned": ms(stopped - t0),
        **{k: ms(v - t0_wall) for k, v in log_marks(relay, t0_wall).items()},
        "new_launcher_spawned": ms(started_after(relay.launcher_pid(), t0_boot)),
        "media_back": max(back) if back else None,
        "start_returned": ms(up - t0),
    }
    return {
        "kind": kind,
        "t": t0,
        "end": end,
        "stop_ms": ms(stopped - t0),
        "down_ms": ms(up - t0),
        "recovered": recovered,
        "restored_flows": restored,
        "flows": flows,
        "timeline_ms": dict(sorted(timeline.items(), key=lambda kv: kv[1] or 0)),
        "start_cmd_to_media_ms": round(max(back) - (stopped - t0) * 1000, 1) if back else None,
        **table_counts(relay),
    }


# Orchestration ---------------------------------------------------------------------------------
@dataclass
class Bench:
    """Everything one run owns; `close` releases it all, whatever happened."""

    flows: int
    repeat: int
    real_call: bool
    started: float = field(default_factory=time.monotonic)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vr-recovery-")))
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    relays: list[RelayProcess] = field(default_factory=list)
    events: dict[str, list[dict]] = field(default_factory=dict)
    baseline: dict[str, list] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    heals: int = 0  # relay restarts needed because a killed worker was never replaced
    close_errors: int = 0  # launcher log lines showing why

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > TIME_BUDGET

    def own(self, cleanup: Callable[[], None]) -> None:
        self.cleanups.append(cleanup)

    def release(self, *cleanups: Callable[[], None]) -> None:
        """Run these cleanups now (in order) instead of at `close`."""
        for cleanup in cleanups:
            if cleanup in self.cleanups:
                self.cleanups.remove(cleanup)
            cleanup()

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        self.cleanups.clear()
        for _ in range(3):  # a launcher spawned by an interrupted `relayctl start` comes late
            self.sweep()
            time.sleep(0.1)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def sweep(self) -> None:
        """Kill (by pid) any process still running from this run's work dir; unlink its relays'
        shared memory."""
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.workdir) in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    proc.wait(2)
        for relay in self.relays:
            for name in relay.shm_names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}")

    def stream(self, relay: RelayProcess) -> tuple[Fleet, StandIn, Any]:
        """A stand-in transceiver and a fleet of flows streaming through `relay`."""
        keys = load_keys(relay.secret_file)
        standin = StandIn(echo=True).start()
        self.own(standin.close)
        fleet = Fleet(relay.public, self.flows)
        self.own(fleet.close)
        fleet.open(keys, standin)
        fleet.start()
        wait_for(lambda: len(fleet.flowing(time.monotonic() - 0.1)) == self.flows, 5, 0.02)
        return fleet, standin, keys

    def relay(self, name: str, extra: list[str] | None = None) -> RelayProcess:
        state = self.workdir / name
        state.mkdir()
        relay = RelayProcess(state, workers=WORKERS, extra=extra)
        self.relays.append(relay)
        self.own(relay.cleanup)
        return relay.start()

    def record(self, scenario: str, event: dict) -> None:
        self.events.setdefault(scenario, []).append(event)

    def repeats(self, scenario: str) -> range:
        """Repeat indices; logs a skip instead when the time budget is spent."""
        if self.out_of_time():
            self.skipped.append(scenario)
            return range(0)
        return range(self.repeat)


def measure_baseline(bench: Bench, fleet: Fleet) -> None:
    """The measuring floor: each flow's longest inter-arrival over one fault-free second."""
    start = time.monotonic()
    time.sleep(1.0)
    bench.baseline = flow_results(fleet, fleet.addrs, start, time.monotonic(), start)


def heal(relay: RelayProcess) -> bool:
    """If a worker is dead and was not replaced, restart the relay so the next kill measures
    a whole relay again; True if that was needed."""
    if all(w["alive"] for w in relay.status()["workers"]):
        return False
    relay.stop()
    relay.start()
    return True


def run_worker_kills(bench: Bench) -> None:
    relay = bench.relay("kill")
    fleet, standin, keys = bench.stream(relay)
    measure_baseline(bench, fleet)
    for r in bench.repeats("worker_kill"):
        if heal(relay):
            bench.heals += 1
        reopened = ensure_flowing(fleet, keys, standin)
        event = kill_one_worker(relay, fleet, standin, r % WORKERS)
        event["reopened_before"] = len(reopened)
        event["clients"] = bench.flows
        bench.record("worker_kill", event)
        if bench.out_of_time():
            break
    log = relay.state_dir / f"relay-{relay.port}.log"
    bench.close_errors = log.read_text(errors="replace").count(f"ValueError: {CLOSE_ERROR}")
    bench.release(fleet.close, standin.close, relay.cleanup)


def run_restarts(bench: Bench, backend: str, redis: RedisServer | None) -> None:
    extra = ["--redis", redis.url] if redis else []
    relay = bench.relay(backend, extra)
    fleet, standin, keys = bench.stream(relay)
    call = None
    if bench.real_call and redis is not None:
        transceiver = TransceiverProcess(relay).start()
        bench.own(transceiver.stop)
        call = RealCall(transceiver.url).start()
        bench.own(call.close)
        wait_for(lambda: len(call.arrivals()) > 10, 5, 0.02, "echoed audio on the real call")
    for kind in KINDS:
        scenario = f"{kind}_{backend}"
        for _ in bench.repeats(scenario):
            reopened = ensure_flowing(fleet, keys, standin)
            event = restart_relay(relay, fleet, kind)
            event["reopened_before"] = len(reopened)
            event["clients"] = bench.flows + (call is not None)
            if call is not None:
                series = {("call", 0): call.arrivals()}
                event["call"] = gap_results(series, event["t"] - LEAD, event["end"], event["t"])
            bench.record(scenario, event)
            if bench.out_of_time():
                break
    if call is not None:
        bench.call = {**call.state(), "sessions_at_transceiver": transceiver.stats()["sessions"]}
        bench.release(call.close, transceiver.stop)
    bench.release(fleet.close, standin.close, relay.cleanup)


# Report ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: every flow sample of a scenario's repeats."""

    scenario: str
    events: list[dict]
    group: str  # which per-flow results of an event: "killed", "other", "flows", "call"
    budget_ms: float | None

    def samples(self, key: str) -> list[Any]:
        return [v for e in self.events for v in e[self.group].get(key, [])]

    def after_up(self) -> list[float]:
        """Per repeat: last flow back minus relay back up."""
        out = []
        for e in self.events:
            back = [b for b in e[self.group]["back_ms"] if b is not None]
            if back and e["down_ms"] is not None:
                out.append(max(back) - e["down_ms"])
        return out

    def figures(self) -> dict[str, Any]:
        gaps = [g for g in self.samples("gap_ms") if g is not None]
        lost = sum(b is None for b in self.samples("back_ms"))
        gap_max = max(gaps, default=float("nan"))
        return {
            "scenario": self.scenario,
            "repeats": len(self.events),
            "flow_samples": len(gaps),
            "gap_p50_ms": harness.percentile(gaps, 50),
            "gap_max_ms": gap_max,
            "missing_packets_max_per_flow": max(self.samples("missing"), default=float("nan")),
            "flows_lost": lost,
            "down_p50_ms": harness.percentile(
                [e["down_ms"] for e in self.events if e["down_ms"] is not None], 50
            ),
            "after_up_p50_ms": harness.percentile(self.after_up(), 50),
            "budget_ms": self.budget_ms,
            "within_budget": None
            if self.budget_ms is None
            else bool(gap_max <= self.budget_ms and lost == 0),
        }

    def cells(self) -> list[Any]:
        f = self.figures()
        budget = f"<= {self.budget_ms:.0f} ms" if self.budget_ms else "-"
        keys = ("repeats", "flow_samples", "gap_p50_ms", "gap_max_ms")
        rest = ("missing_packets_max_per_flow", "flows_lost", "down_p50_ms", "after_up_p50_ms")
        return [self.scenario, *(f[k] for k in keys), *(f[k] for k in rest), budget]


HEADERS = (
    "scenario",
    "repeats",
    "flow samples",
    "gap p50 ms",
    "gap max ms",
    "pkts lost/flow max",
    "flows lost",
    "relay down ms",
    "after up ms",
    "budget",
)
NOTES = (
    "relay down: worker kill = kill -9 until the replacement is alive in `status`; restart = "
    "`relayctl stop` called until `relayctl start` returned.",
    "after up: last flow back minus relay down. Worker kill: back = first echo of a packet sent "
    "after the kill; restart: back = end of the flow's longest silence (negative: media was back "
    "before `relayctl start` returned).",
)
KINDS = ("restart", "handover", "crash")
LABELS = {
    "restart": "relayctl stop+start",
    "handover": "relayctl restart",
    "crash": "kill -9 all + start",
}


def rows(bench: Bench) -> list[Row]:
    baseline = {"baseline": bench.baseline, "down_ms": None}
    out = [Row("baseline (no fault, 1 s)", [baseline], "baseline", None)]
    kills = bench.events.get("worker_kill", [])
    if kills:
        out.append(Row("worker kill -9: its flows", kills, "killed", BUDGET_WORKER_MS))
        out.append(Row("worker kill -9: other flows", kills, "other", BUDGET_WORKER_MS))
    for kind in KINDS:
        for backend in ("redis", "file"):
            events = bench.events.get(f"{kind}_{backend}", [])
            budget = BUDGET_RESTART_MS if backend == "redis" else None
            if events:
                out.append(Row(f"{LABELS[kind]} ({backend})", events, "flows", budget))
            if events and "call" in events[0]:
                out.append(Row("  + real WebRTC call", events, "call", budget))
    return out


TIMELINE = (
    ("media_silent", "media stops"),
    ("old_launcher_stopped", "old launcher stopped"),
    ("stop_returned", "stop/kill returned"),
    ("new_launcher_spawned", "launcher spawned"),
    ("stale_shm_cleared", "stale shm cleared"),
    ("flows_restored", "flows restored"),
    ("relay_up_logged", "relay up logged"),
    ("media_back", "last flow back"),
    ("start_returned", "start returned"),
)


def timeline_table(bench: Bench) -> str:
    """Where a restart's time goes: p50 ms after the stop call (or the kill) of each step."""
    out = []
    for scenario, events in bench.events.items():
        if scenario == "worker_kill":
            continue
        cells: list[Any] = [scenario, len(events)]
        for key, _ in TIMELINE:
            values = [e["timeline_ms"].get(key) for e in events]
            cells.append(harness.percentile([v for v in values if v is not None], 50))
        derived = [e["start_cmd_to_media_ms"] for e in events if e["start_cmd_to_media_ms"]]
        out.append([*cells, harness.percentile(derived, 50)])
    headers = ["scenario", "repeats", *(label for _, label in TIMELINE), "start cmd -> media"]
    return harness.table(
        "restart timeline: p50 ms after `relayctl stop` was called (crash: after kill -9 began)",
        headers,
        out,
    )


def findings(bench: Bench, table_rows: list[Row]) -> list[str]:
    """Budget misses and table anomalies, in one line each."""
    notes = []
    for row in table_rows:
        fig = row.figures()
        if fig["within_budget"] is False:
            notes.append(
                f"{row.scenario.strip()}: gap max {fig['gap_max_ms']:.0f} ms "
                f"(p50 {fig['gap_p50_ms']:.0f} ms), {fig['flows_lost']} flows lost; "
                f"budget {row.budget_ms:.0f} ms"
            )
    for scenario, events in bench.events.items():
        clients = events[0]["clients"]
        held = [e["table_flows"] for e in events]
        if max(held) > clients:
            notes.append(
                f"{scenario}: shared table holds {min(held)}..{max(held)} entries for {clients} "
                f"live clients after the event (per shard: {events[-1]['per_shard']})"
            )
        restored = [e["restored_flows"] for e in events if "restored_flows" in e]
        if restored and (min(restored) != clients or max(restored) != clients):
            notes.append(
                f"{scenario}: launcher reports {min(restored)}..{max(restored)} restored flows "
                f"for {clients} live clients"
            )
    kills = bench.events.get("worker_kill", [])
    unreplaced = sum(not e["replaced"] for e in kills)
    if unreplaced:
        notes.append(
            f"worker kill: the launcher never replaced the killed worker in {unreplaced} of "
            f"{len(kills)} kills (slot left dead; relay log shows {bench.close_errors}x "
            f"'ValueError: {CLOSE_ERROR}' in on_exit); relay restarted {bench.heals}x to go on"
        )
    if any(e["other_flows_moved"] for e in kills):
        moved = [
            f"{e['other_flows_moved']}/{e['clients'] - e['flows_on_killed_worker']}" for e in kills
        ]
        notes.append(
            "worker kill: flows of the surviving worker that switched worker when the replacement "
            f"bound (SO_REUSEPORT group reordered), per repeat: {', '.join(moved)}"
        )
    if bench.call and (bench.call.get("closed") or bench.call.get("sessions_at_transceiver") != 1):
        notes.append(f"real call did not survive: {bench.call}")
    if bench.skipped:
        notes.append(f"time budget spent, skipped: {', '.join(bench.skipped)}")
    return notes


def report(bench: Bench, info: dict[str, Any]) -> None:
    table_rows = rows(bench)
    text = harness.table(
        f"media gap per flow at 50 packets/s each way, {bench.flows} flows, {WORKERS} workers",
        HEADERS,
        [r.cells() for r in table_rows],
    )
    text += "\n" + "\n".join(NOTES)
    notes = findings(bench, table_rows)
    tables = [text, timeline_table(bench)]
    if notes:
        tables.append("findings:\n" + "\n".join(f"- {n}" for n in notes))
    figures = {
        "config": {
            "flows": bench.flows,
            "repeat": bench.repeat,
            "workers": WORKERS,
            "interval_s": INTERVAL,
            "real_call": bench.real_call,
        },
        "scenarios": [r.figures() for r in table_rows],
        "baseline": bench.baseline,
        "events": {k: [{**e, "t": None, "end": None} for e in v] for k, v in bench.events.items()},
        "real_call": bench.call,
        "findings": notes,
        "worker_not_replaced": {"heals": bench.heals, "close_errors_in_log": bench.close_errors},
        "elapsed_s": round(time.monotonic() - bench.started, 1),
    }
    harness.report("recovery", tables, figures, info)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="events per scenario (default 5)")
    parser.add_argument("--flows", type=int, default=24, help="client flows (default 24)")
    parser.add_argument("--no-call", action="store_true", help="skip the real WebRTC call")
    return parser.parse_args()


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every process and segment is still cleaned up."""
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    info = harness.machine()
    bench = Bench(flows=args.flows, repeat=max(1, args.repeat), real_call=not args.no_call)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        run_worker_kills(bench)
        redis = RedisServer(bench.workdir).start()
        bench.own(redis.stop)
        run_restarts(bench, "redis", redis)
        run_restarts(bench, "file", None)
    finally:
        bench.close()
    report(bench, info)


if __name__ == "__main__":
    main()
