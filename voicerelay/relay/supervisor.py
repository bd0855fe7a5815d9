"""Worker supervision: fork one worker per slot, pin it to a core, restart it the moment it
exits, stop them all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from typing import Any

import psutil

from voicerelay.relay.config import RelayConfig
from voicerelay.relay.worker import run_worker

log = logging.getLogger("voicerelay.launcher")
_fork = multiprocessing.get_context("fork")
REAP_TIMEOUT = 0.5  # seconds to wait for a dead worker to be reaped before restarting anyway
STOP_TIMEOUT = 3.0  # seconds for every worker to leave after SIGTERM, before SIGKILL


class WorkerSlot:
    """One worker position: its process, and how often it was restarted."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self.started_at = 0.0


class Supervisor:
    """Keeps `config.workers` worker processes running until `stop`."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.stopping = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fork every worker and watch each for its exit."""
        for slot in self.slots:
            self._start_worker(slot)
            self._watch(loop, slot)

    def unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop restarting workers (the launcher is stopping)."""
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(slot.process.sentinel)

    def status(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, restarts, internal address."""
        return [
            {
                "index": s.index,
                "pid": s.process.pid if s.process else None,
                "alive": bool(s.process and s.process.is_alive()),
                "restarts": s.restarts,
                "internal": "{}:{}".format(*self.config.internal_addr(s.index)),
            }
            for s in self.slots
        ]

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL whichever is still there after `STOP_TIMEOUT`."""
        self.stopping = True
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

    def _start_worker(self, slot: WorkerSlot) -> None:
        process = _fork.Process(
            target=run_worker,
            args=(self.config, slot.index),
            name=f"voicerelay-worker-{slot.index}",
            daemon=False,
        )
        process.start()
        slot.process = process
        slot.started_at = time.time()
        if self.config.pin_cpus:
            cpus = psutil.Process().cpu_affinity() or list(range(os.cpu_count() or 1))
            with contextlib.suppress(psutil.Error):
                psutil.Process(process.pid).cpu_affinity([cpus[slot.index % len(cpus)]])

    def _watch(self, loop: asyncio.AbstractEventLoop, slot: WorkerSlot) -> None:
        """Restart a worker the moment it exits (its sentinel becomes readable)."""
        assert slot.process is not None
        sentinel = slot.process.sentinel

        def on_exit() -> None:
            loop.remove_reader(sentinel)
            if self.stopping:
                return
            process = slot.process
            assert process is not None
            # The sentinel fires when the worker's files close, a moment before the kernel
            # lets us reap it: wait for that (bounded), and restart whatever happens.
            try:
                process.join(REAP_TIMEOUT)
                log.warning(
                    "worker %d (pid %s) exited with %s; restarting",
                    slot.index,
                    process.pid,
                    process.exitcode,
                )
                with contextlib.suppress(ValueError):  # not reaped yet: its zombie is reaped
                    process.close()  # by multiprocessing's next active_children() sweep
            finally:
                slot.restarts += 1
                self._start_worker(slot)
                self._watch(loop, slot)

        loop.add_reader(sentinel, on_exit)
