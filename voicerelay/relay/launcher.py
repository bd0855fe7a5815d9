"""The relay launcher: owns the shared memory and the snapshotter, runs the worker supervisor
and answers `relayctl` on the control socket until it is stopped.

It removes, on the way out, only what it created itself: a start that fails (another relay
already runs on the port) leaves that relay's pid file and control socket alone.

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

from aiohttp import web
from prometheus_client import CollectorRegistry

from voicerelay import metrics
from voicerelay.addresses import format_addr
from voicerelay.config import ConfigError
from voicerelay.process import configure_logging
from voicerelay.relay import control, snapshot
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.fastpath import FastPathUnavailable
from voicerelay.relay.fastpath.kernel import RENEW, FastPathSettings, FlowMap, KernelFastPath
from voicerelay.relay.fastpath.layout import address, client_of_key
from voicerelay.relay.preflight import PidFile, preflight
from voicerelay.relay.router import COUNTER_FIELDS
from voicerelay.relay.supervisor import Supervisor
from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowTable

log = logging.getLogger("voicerelay.launcher")
KERNEL_FLOWS_SHOWN = 1000  # entries `kernel_flows` lists (a control reply stays small)


class Launcher:
    """Everything `relayctl start` runs: `prepare`, `run` until stopped, `shutdown`."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.supervisor = Supervisor(config)
        self.table: FlowTable | None = None
        self.counters: CounterArray | None = None
        self.snapshotter: snapshot.Snapshotter | None = None
        self.pid_file: PidFile | None = None
        self.socket_inode: int | None = None  # of the control socket this launcher bound
        self.started = time.time()
        self.restore = snapshot.RestoreResult(source="")
        self._done: asyncio.Event | None = None
        self.metrics_runner: web.AppRunner | None = None
        self.metrics_port: int | None = None  # where /metrics listens, once it does
        self.fast_path: KernelFastPath | None = None
        self.fast_path_state = "off"  # what status reports: "on (...)", "off", "off: why"

    # Start ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail with a one-line error, before any process is forked."""
        cfg = self.config
        self.pid_file = preflight(cfg)
        self.supervisor.close_in_worker = (self.pid_file.fileno(),)
        seal = snapshot.seal_for(cfg)
        store = snapshot.open_store(cfg)
        self.table = FlowTable.create(cfg.shm_name, cfg.workers, cfg.capacity, time.monotonic())
        self.supervisor.on_exit = self.table.bump_generation  # survivors adopt its clients
        self.counters = CounterArray.create(cfg.counters_name, cfg.workers, COUNTER_FIELDS)
        self.restore = snapshot.restore(
            self.table,
            store,
            time.monotonic(),
            seal,
            networks=cfg.networks,
            idle_timeout=cfg.idle_timeout,
        )
        if self.restore.restored:
            log.info("restored %d flows from %s", self.restore.restored, store.describe())
        self.snapshotter = snapshot.Snapshotter(self.table, store, seal, cfg.snapshot_interval)
        if cfg.kernel_fast_path:
            self._start_fast_path()

    def _start_fast_path(self) -> None:
        """Load and attach the kernel fast path; when it cannot run, say why in one line and
        forward in userspace."""
        cfg = self.config
        settings = FastPathSettings(
            (cfg.listen_host, cfg.listen_port),
            cfg.internal_host,
            range(cfg.internal_port_base, cfg.internal_port_base + cfg.workers),
        )
        try:
            self.fast_path = KernelFastPath.start(settings, cfg.state_dir / "fastpath")
        except FastPathUnavailable as exc:
            self.fast_path_state = f"off: {exc}"
            log.warning("kernel fast path off: %s; forwarding in userspace", exc)
            return
        self.supervisor.kernel_flows_fd = self.fast_path.flows_fd
        self.fast_path_state = self.fast_path.describe()
        off = self.fast_path.forwarding_off()
        if off:
            self.fast_path_state += (
                f"; forwarding off on {', '.join(off)}: peers on other hosts stay in userspace "
                f"(sysctl net.ipv4.conf.{off[0]}.forwarding=1)"
            )
        log.info("kernel fast path %s", self.fast_path_state)

    async def _renew_fast_path(self) -> None:
        """Keep the kernel program forwarding while this launcher lives."""
        assert self.fast_path is not None
        while True:
            await asyncio.sleep(RENEW)
            try:
                self.fast_path.renew()
            except OSError as exc:
                log.warning("renewing the kernel fast path failed: %s", exc)

    async def run(self) -> None:
        """Workers, snapshots and the control socket until SIGTERM/SIGINT/SIGHUP or `stop`."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        await self._serve_metrics()  # a taken --metrics port fails before any worker is forked
        self.supervisor.start(loop)
        assert self.snapshotter is not None
        self.snapshotter.start()
        renewer = asyncio.ensure_future(self._renew_fast_path()) if self.fast_path else None
        path = self.config.control_socket
        operations = {
            "status": self.status,
            "stats": self.stats,
            "stop": self._stop_requested,
            "kernel_flows": self.kernel_flows,
        }
        try:
            server = await control.serve(path, operations)
        except OSError as exc:
            await self._stop_metrics()
            raise ConfigError(
                f"cannot create the control socket {path} ({exc.strerror}): check --state-dir"
            ) from None
        self.socket_inode = path.stat().st_ino
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
            if renewer is not None:
                renewer.cancel()
            self.supervisor.unwatch(loop)
            server.close()
            await self._stop_metrics()

    async def _serve_metrics(self) -> None:
        """/metrics, /healthz and /readyz on `--metrics`, answered on this event loop from
        shared memory: a scrape costs the workers nothing."""
        cfg = self.config
        if cfg.metrics_port is None:
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            metrics.FunctionCollector(
                lambda: metrics.relay_families(self.metrics_stats(), time.time())
            )
        )
        app = metrics.health_app(registry, self.not_ready)
        try:
            self.metrics_runner = await metrics.serve_health(
                app, cfg.metrics_host, cfg.metrics_port
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve --metrics on {cfg.metrics_host}:{cfg.metrics_port} "
                f"({exc.strerror}): choose another port"
            ) from None
        sockets = metrics.listening_sockets(self.metrics_runner)
        # Workers forked later must not hold the port (nor accept on it).
        self.supervisor.close_in_worker += tuple(s.fileno() for s in sockets)
        self.metrics_port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, self.metrics_port)

    async def _stop_metrics(self) -> None:
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None

    def not_ready(self) -> str | None:
        """Why this relay is not ready (a worker down, no flow table), or None."""
        if self.table is None or self.counters is None:
            return "flow table not attached"
        if not metrics.relay_ready(self.status()):
            return "not every worker is running"
        return None

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
            "restored_flows": self.restore.restored,
            "fast_path": self.fast_path_state,
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
        status["restore"] = self.restore.as_dict()
        if self.fast_path is not None:
            status["kernel"] = self.fast_path.stats()
        return status

    def kernel_flows(self) -> dict[str, Any]:
        """The kernel's flow map: how many entries, and the first `KERNEL_FLOWS_SHOWN` of them
        (client, transceiver, owning worker's internal port, what each forwarded), for
        operators and tests; empty when the fast path is off."""
        flows = []
        items = FlowMap(self.fast_path.flows_fd).items() if self.fast_path is not None else []
        if items:
            for key, reading in items[:KERNEL_FLOWS_SHOWN]:
                flows.append(
                    {
                        "client": format_addr(client_of_key(key)),
                        "transceiver": format_addr(address(reading.transceiver)),
                        "internal_port": reading.internal_port,
                        "packets_in": reading.packets_in,
                        "packets_out": reading.packets_out,
                    }
                )
        return {"ok": True, "fast_path": self.fast_path_state, "total": len(items), "flows": flows}

    def metrics_stats(self) -> dict[str, Any]:
        """What a scrape reads: `status()` with each worker's counter row and the snapshot
        state (not the flow-table scan `stats()` does; the workers' "flows" counter says it)."""
        assert self.counters is not None
        status = self.status()
        for entry in status["workers"]:
            entry["counters"] = self.counters.read(entry["index"])
        status["snapshot"] = self.snapshotter.state() if self.snapshotter else {}
        return status

    # Stop -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop workers, take the final snapshot, remove every trace of this launcher (and
        nothing of another one's: a start that failed has nothing to remove)."""
        if self.pid_file is None:
            return
        if self.fast_path is not None:  # first: the workers take every packet from now on
            self.fast_path.close()
            self.fast_path = None
        self.supervisor.stop()
        if self.snapshotter is not None:
            self.snapshotter.stop(final=True)
        for shared in (self.table, self.counters):
            if shared is not None:
                shared.unlink()
                with contextlib.suppress(BufferError):
                    shared.close()
        self._remove_control_socket()
        self.pid_file.release()
        self.pid_file = None
        log.info("relay on port %d stopped", self.config.listen_port)

    def _remove_control_socket(self) -> None:
        """Unlink the control socket if it is still the one this launcher bound."""
        path = self.config.control_socket
        with contextlib.suppress(FileNotFoundError):
            if self.socket_inode is not None and path.stat().st_ino == self.socket_inode:
                path.unlink()


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
