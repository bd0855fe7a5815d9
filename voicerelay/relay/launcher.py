"""The relay launcher: owns the shared memory and the snapshotter, runs the worker supervisor
and answers `relayctl` on the control socket until it is stopped.

`run_foreground(config)` runs one in this process; `python -m voicerelay.relay.launcher
CONFIG_JSON` is the same as a process of its own (`relay.spawn` starts it both ways).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

from voicerelay.config import ConfigError
from voicerelay.process import configure_logging
from voicerelay.relay import control, snapshot
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.preflight import preflight
from voicerelay.relay.router import COUNTER_FIELDS
from voicerelay.relay.supervisor import Supervisor
from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowTable

log = logging.getLogger("voicerelay.launcher")


class Launcher:
    """Everything `relayctl start` runs: `prepare`, `run` until stopped, `shutdown`."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.supervisor = Supervisor(config)
        self.table: FlowTable | None = None
        self.counters: CounterArray | None = None
        self.snapshotter: snapshot.Snapshotter | None = None
        self.started = time.time()
        self.restored = 0
        self._done: asyncio.Event | None = None

    # Start ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail with a one-line error, before any process is forked."""
        cfg = self.config
        preflight(cfg)
        self.table = FlowTable.create(cfg.shm_name, cfg.workers, cfg.capacity, time.monotonic())
        self.counters = CounterArray.create(cfg.counters_name, cfg.workers, COUNTER_FIELDS)
        store = snapshot.open_store(cfg)
        self.restored = snapshot.restore(
            self.table, store, time.monotonic(), idle_timeout=cfg.idle_timeout
        )
        if self.restored:
            log.info("restored %d flows from %s", self.restored, store.describe())
        self.snapshotter = snapshot.Snapshotter(self.table, store, cfg.snapshot_interval)
        cfg.pid_file.write_text(f"{os.getpid()}\n")

    async def run(self) -> None:
        """Workers, snapshots and the control socket until SIGTERM/SIGINT/SIGHUP or `stop`."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.supervisor.start(loop)
        assert self.snapshotter is not None
        self.snapshotter.start()
        server = await control.serve(
            self.config.control_socket,
            {"status": self.status, "stats": self.stats, "stop": self._stop_requested},
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._done.set)
        log.info(
            "relay up on %s:%d with %d workers (pid %d)",
            self.config.listen_host,
            self.config.listen_port,
            self.config.workers,
            os.getpid(),
        )
        try:
            await self._done.wait()
        finally:
            self.supervisor.unwatch(loop)
            server.close()

    # Control operations ---------------------------------------------------------------------
    def _stop_requested(self) -> dict[str, Any]:
        assert self._done is not None
        asyncio.get_running_loop().call_soon(self._done.set)
        return {"ok": True, "stopping": True, "pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "listen": f"{self.config.listen_host}:{self.config.listen_port}",
            "uptime": time.time() - self.started,
            "restored_flows": self.restored,
            "workers": self.supervisor.status(),
        }

    def stats(self) -> dict[str, Any]:
        assert self.counters is not None and self.table is not None
        status = self.status()
        for entry in status["workers"]:
            entry["counters"] = self.counters.read(entry["index"])
            entry["table_flows"] = self.table.count(entry["index"])
        totals = {f: sum(w["counters"][f] for w in status["workers"]) for f in COUNTER_FIELDS}
        status["totals"] = totals
        status["table_flows"] = self.table.count()
        status["snapshot"] = self.snapshotter.state() if self.snapshotter else {}
        return status

    # Stop -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop workers, take the final snapshot, remove every trace."""
        self.supervisor.stop()
        if self.snapshotter is not None:
            self.snapshotter.stop(final=True)
        for shared in (self.table, self.counters):
            if shared is not None:
                shared.unlink()
                with contextlib.suppress(BufferError):
                    shared.close()
        for path in (self.config.control_socket, self.config.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("relay on port %d stopped", self.config.listen_port)


def run_foreground(config: RelayConfig) -> None:
    """Run a relay in this process until SIGTERM/SIGINT or `relayctl stop`."""
    launcher = Launcher(config)
    try:
        launcher.prepare()
        asyncio.run(launcher.run())
    finally:
        launcher.shutdown()


def serve(config: RelayConfig) -> int:
    """Run a launcher in this process until stopped; 2 after a one-line config error."""
    configure_logging()
    try:
        run_foreground(config)
    except ConfigError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    """`python -m voicerelay.relay.launcher CONFIG_JSON` (how `relayctl up` runs one)."""
    return serve(RelayConfig.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
