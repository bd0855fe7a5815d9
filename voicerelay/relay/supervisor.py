"""Worker supervision: fork one worker per slot, pin it to a core, restart it when it exits,
stop them all.

A worker that exits after running a while is replaced at once. One that keeps dying young (it
cannot start: its internal port is taken, the secret does not load, ...) is restarted with an
exponential backoff (`Backoff`, a pure policy), and each exit is one log line with its reason:
the worker reports its exception through a pipe instead of printing a traceback. While backing
off, a slot whose internal port is taken is not forked at all, so no short-lived worker joins
the public port's SO_REUSEPORT group only to take packets with it when it dies. Nothing here
blocks the launcher's event loop, so `relayctl status` and `stats` answer throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from voicerelay.config import ConfigError
from voicerelay.net import check_port_free
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.worker import run_worker

log = logging.getLogger("voicerelay.launcher")
_fork = multiprocessing.get_context("fork")
REAP_POLL = 0.005  # s between checks for a dead worker's exit status (never a blocking wait)
REAP_TIMEOUT = 0.5  # s after which an exited worker is replaced even if not yet reaped
STOP_TIMEOUT = 3.0  # s for every worker to leave after SIGTERM, before SIGKILL
EXIT_FAILED = 3  # a worker's exit code when its run raised (the reason went through the pipe)
MAX_REASON = 300  # characters of an exit reason kept and logged


@dataclass
class Backoff:
    """When to start a worker again (pure: times are arguments).

    An exit after `stable_after` seconds of running is a fresh start: restart at once. Exits
    sooner than that form a streak: the first is restarted at once too (a kill, one bad
    moment), then `first`, doubling up to `cap`. A start skipped because its cause is still
    there (`skipped`) lengthens the streak like an exit.
    """

    first: float = 0.1
    cap: float = 5.0
    stable_after: float = 5.0
    streak: int = 0

    def exited(self, started: float, now: float) -> float:
        """Record an exit of a worker started at `started`; the delay before the next start."""
        if now - started >= self.stable_after:
            self.streak = 0
        self.streak += 1
        return self.delay()

    def skipped(self) -> float:
        """Record a start not attempted; the delay before the next try."""
        self.streak += 1
        return self.delay()

    def delay(self) -> float:
        """The current delay: 0 for the first exit of a streak, then exponential, capped."""
        if self.streak <= 1:
            return 0.0
        return min(self.cap, self.first * 2.0 ** min(self.streak - 2, 32))

    def settled(self, started: float, now: float) -> bool:
        """Has the worker started at `started` run long enough to end a streak?"""
        return now - started >= self.stable_after

    def worth_logging(self, same_reason: bool) -> bool:
        """Log a new reason always; the same one again at streaks 1, 2, 4, 8, ...: a worker
        that fails for hours writes a few dozen lines, not one per attempt."""
        return not same_reason or self.streak & (self.streak - 1) == 0


class WorkerSlot:
    """One worker position: its process, how often it was forked again, why it last exited."""

    def __init__(self, index: int, backoff: Backoff) -> None:
        self.index = index
        self.backoff = backoff
        self.process: multiprocessing.process.BaseProcess | None = None  # None once reaped
        self.pid: int | None = None  # of the last worker forked
        self.reason_fd: int | None = None  # read end of the pipe the worker reports through
        self.restarts = 0
        self.started_at = 0.0  # monotonic
        self.last_exit: str | None = None
        self.retry_at: float | None = None  # monotonic, while backing off
        self.timer: asyncio.TimerHandle | None = None


class Supervisor:
    """Keeps `config.workers` worker processes running until `stop`.

    `close_in_worker`: descriptors a forked worker must not keep (the launcher's pid-file lock).
    `kernel_flows_fd`: the kernel fast path's flow map, which every worker inherits (None: off).
    `on_exit`: called when a worker has exited (the launcher tells the surviving workers, so
    they adopt its clients at once instead of when a replacement starts).
    """

    def __init__(
        self,
        config: RelayConfig,
        backoff: Backoff | None = None,
        close_in_worker: Sequence[int] = (),
        on_exit: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        self.on_exit = on_exit
        template = backoff or Backoff()
        self.slots = [
            WorkerSlot(i, Backoff(template.first, template.cap, template.stable_after))
            for i in range(config.workers)
        ]
        self.close_in_worker = tuple(close_in_worker)
        self.kernel_flows_fd: int | None = None
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # Life cycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fork every worker and watch each for its exit."""
        self._loop = loop
        for slot in self.slots:
            self._launch(slot)

    def unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop restarting workers (the launcher is stopping)."""
        self.stopping = True
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
            if slot.process is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(slot.process.sentinel)

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL whichever is still there after `STOP_TIMEOUT`."""
        self.stopping = True
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
        processes = [s.process for s in self.slots if s.process is not None]
        for p in processes:
            with contextlib.suppress(Exception):
                p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in processes:
            with contextlib.suppress(Exception):
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(1.0)
        for slot in self.slots:
            _close_fd(slot)

    def status(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, state (running, backoff, stopped), restarts, why it
        last exited, early exits in a row, seconds until the next start, internal address."""
        now = time.monotonic()
        return [self._slot_status(s, now) for s in self.slots]

    def _slot_status(self, slot: WorkerSlot, now: float) -> dict[str, Any]:
        alive = bool(slot.process is not None and slot.process.is_alive())
        settled = alive and slot.backoff.settled(slot.started_at, now)
        if alive:
            state = "running"
        elif slot.retry_at is not None and not self.stopping:
            state = "backoff"
        else:
            state = "stopped"
        return {
            "index": slot.index,
            "pid": slot.pid,
            "alive": alive,
            "state": state,
            "restarts": slot.restarts,
            "last_exit": slot.last_exit,
            "early_exits": 0 if settled else slot.backoff.streak,
            "retry_in": max(0.0, slot.retry_at - now) if state == "backoff" else None,
            "internal": "{}:{}".format(*self.config.internal_addr(slot.index)),
        }

    # Starting ---------------------------------------------------------------------------------
    def _launch(self, slot: WorkerSlot) -> None:
        """Start the slot's worker, unless (while backing off) its known cause is still there."""
        slot.timer = slot.retry_at = None
        if self.stopping:
            return
        blocked = self._blocked(slot) if slot.backoff.streak >= 2 else None
        if blocked is not None:
            delay = slot.backoff.skipped()
            self._note(slot, f"not restarted: {blocked}", blocked, delay)
            self._schedule(slot, delay)
            return
        if slot.pid is not None:
            slot.restarts += 1
        try:
            self._fork(slot)
        except OSError as exc:  # no fork (EAGAIN, ENOMEM): like an exit at once
            reason = f"cannot fork: {exc.strerror}"
            delay = slot.backoff.skipped()
            self._note(slot, f"not started: {reason}", reason, delay)
            self._schedule(slot, delay)

    def _blocked(self, slot: WorkerSlot) -> str | None:
        """Why forking this worker now would fail for certain (its internal port is taken)."""
        host, port = self.config.internal_addr(slot.index)
        try:
            check_port_free(host, port, "internal address", "--internal")
        except ConfigError:
            return f"its internal address {host}:{port} is in use by another socket"
        return None

    def _fork(self, slot: WorkerSlot) -> None:
        read_fd, write_fd = os.pipe()
        process = _fork.Process(
            target=_worker_main,
            args=(
                self.config,
                slot.index,
                write_fd,
                (read_fd, *self.close_in_worker),
                self.kernel_flows_fd,
            ),
            name=f"voicerelay-worker-{slot.index}",
            daemon=False,
        )
        try:
            process.start()
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        _close_fd(slot)
        slot.process, slot.pid, slot.reason_fd = process, process.pid, read_fd
        slot.started_at = time.monotonic()
        if self.config.pin_cpus:
            cpus = psutil.Process().cpu_affinity() or list(range(os.cpu_count() or 1))
            with contextlib.suppress(psutil.Error):
                psutil.Process(process.pid).cpu_affinity([cpus[slot.index % len(cpus)]])
        assert self._loop is not None
        self._loop.add_reader(process.sentinel, self._on_exit, slot, process)
        if slot.backoff.streak >= 2:
            slot.timer = self._loop.call_later(
                slot.backoff.stable_after, self._settle, slot, process.pid
            )

    def _settle(self, slot: WorkerSlot, pid: int) -> None:
        """A worker forked after early exits has now run `stable_after`: the streak ends."""
        slot.timer = None
        if slot.pid == pid and slot.process is not None and slot.process.is_alive():
            log.info(
                "worker %d (pid %d) is up again after %d early exits",
                slot.index,
                pid,
                slot.backoff.streak,
            )
            slot.backoff.streak = 0

    def _schedule(self, slot: WorkerSlot, delay: float) -> None:
        assert self._loop is not None
        if slot.timer is not None:  # a pending settle check of the worker that just exited
            slot.timer.cancel()
        slot.retry_at = time.monotonic() + delay
        slot.timer = self._loop.call_later(delay, self._launch, slot)

    # Exits ------------------------------------------------------------------------------------
    def _on_exit(self, slot: WorkerSlot, process: multiprocessing.process.BaseProcess) -> None:
        """The worker's sentinel became readable: it has exited (or is about to be reaped)."""
        assert self._loop is not None
        self._loop.remove_reader(process.sentinel)
        self._reap(slot, process, time.monotonic() + REAP_TIMEOUT)

    def _reap(
        self, slot: WorkerSlot, process: multiprocessing.process.BaseProcess, deadline: float
    ) -> None:
        """Collect the exit status without blocking the loop (the sentinel fires a moment
        before the kernel lets us reap), then decide when to start again."""
        if self.stopping:
            return
        assert self._loop is not None
        now = time.monotonic()
        if process.exitcode is None and now < deadline:
            self._loop.call_later(REAP_POLL, self._reap, slot, process, deadline)
            return
        reason = _exit_reason(process.exitcode, _read_reason(slot))
        with contextlib.suppress(ValueError):  # not reaped yet: multiprocessing reaps it later
            process.close()
        slot.process = None
        if self.on_exit is not None:
            self.on_exit()
        delay = slot.backoff.exited(slot.started_at, now)
        ran = now - slot.started_at
        self._note(slot, f"(pid {slot.pid}) exited after {ran:.2f} s: {reason}", reason, delay)
        self._schedule(slot, delay)

    def _note(self, slot: WorkerSlot, what: str, reason: str, delay: float) -> None:
        """One line per exit or skipped start (fewer while the same reason repeats)."""
        same = reason == slot.last_exit
        slot.last_exit = reason
        if not slot.backoff.worth_logging(same):
            return
        streak = slot.backoff.streak
        then = "restarting now" if delay == 0 else f"retrying in {delay:.1f} s"
        if streak > 1:
            then += f" ({streak} early exits in a row)"
        log.warning("worker %d %s; %s", slot.index, what, then)


# In the worker process -------------------------------------------------------------------------


def _worker_main(
    config: RelayConfig,
    index: int,
    reason_fd: int,
    close: Sequence[int],
    kernel_flows_fd: int | None = None,
) -> None:
    """A forked worker: run it; if its run raises, report why in one line and exit."""
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        run_worker(config, index, kernel_flows_fd)
    except BaseException as exc:  # a failed worker says why, then exits
        line = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_REASON]
        with contextlib.suppress(OSError):
            os.write(reason_fd, line.encode("utf-8", "replace"))
        os._exit(EXIT_FAILED)
    os._exit(0)


def _read_reason(slot: WorkerSlot) -> str:
    """What the worker reported before exiting ('' if nothing); closes the pipe."""
    if slot.reason_fd is None:
        return ""
    try:
        os.set_blocking(slot.reason_fd, False)
        return os.read(slot.reason_fd, 4 * MAX_REASON).decode("utf-8", "replace")
    except OSError:  # nothing written (BlockingIOError only if a grandchild holds it open)
        return ""
    finally:
        _close_fd(slot)


def _close_fd(slot: WorkerSlot) -> None:
    if slot.reason_fd is not None:
        with contextlib.suppress(OSError):
            os.close(slot.reason_fd)
        slot.reason_fd = None


def _exit_reason(exitcode: int | None, reported: str) -> str:
    """An exit in words: what the worker reported, else its exit code or signal."""
    if reported:
        return reported
    if exitcode is None:
        return "exited (status not yet known)"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
