"""The relay launcher: owns the shared memory, forks and supervises one worker per core,
snapshots the flow table, and answers `relayctl` on a unix control socket.

Run in the foreground with `run_foreground(config)`, or detached with
`start_background(config)` (a forked, detached copy of this process), or `restart(config)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from voicerelay.relay import control, snapshot
from voicerelay.relay.config import ConfigError, RelayConfig
from voicerelay.relay.router import COUNTER_FIELDS
from voicerelay.relay.worker import run_worker
from voicerelay.shm import segment
from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire.token import TokenError, load_keys, write_new_secret

log = logging.getLogger("voicerelay.launcher")
_fork = multiprocessing.get_context("fork")
REAP_TIMEOUT = 0.5  # seconds to wait for a dead worker to be reaped before restarting anyway


def ensure_secret(config: RelayConfig) -> None:
    """Create the default secret (<state-dir>/secret.key) on first start; fail in one line if
    the secret does not load.

    Only the default is ever created. A secret file named explicitly (--secret-file or
    VOICERELAY_SECRET_FILE) must already exist: inventing a fresh key there would make the relay
    reject every token the cluster's transceivers seal with the real one.
    """
    path = config.secret_path
    default = config.state_dir / "secret.key"
    if not path.exists():
        if config.secret_file is not None and path != default:
            raise ConfigError(
                f"secret file {path} does not exist: copy the cluster's secret there, or drop "
                f"--secret-file to use {default}, "
                "created on first start"
            )
        try:
            write_new_secret(path)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the secret {path} ({exc.strerror}): choose a writable --state-dir"
            ) from None
        log.info("created secret %s", path)
    try:
        load_keys(path)
    except TokenError as exc:
        raise ConfigError(str(exc).removeprefix("secret: ")) from None


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """Refuse to share a port with a stranger (SO_REUSEPORT would silently split traffic)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"{what} {host}:{port} is in use ({exc.strerror}): choose another with {option}"
            ) from None


def config_to_json(config: RelayConfig) -> str:
    return json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    )


def config_from_json(text: str) -> RelayConfig:
    return RelayConfig(**json.loads(text))


class WorkerSlot:
    """One worker position: its process, and how often it was restarted."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self.started_at = 0.0


class Launcher:
    """Everything `relayctl start` runs."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.table: FlowTable | None = None
        self.counters: CounterArray | None = None
        self.snapshotter: snapshot.Snapshotter | None = None
        self.stopping = False
        self.started = time.time()
        self.restored = 0
        self._done: asyncio.Event | None = None

    # Start ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail with a one-line error, before any process is forked."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if control.is_running(cfg):
            raise ConfigError(
                f"a relay already runs on port {cfg.listen_port}: stop it with `relayctl stop`"
            )
        for stale in (cfg.control_socket, cfg.pid_file):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        ensure_secret(cfg)
        for name in (cfg.shm_name, cfg.counters_name):
            if FlowTable.clear_stale(name):
                log.warning("cleared stale shared memory %s left by a dead launcher", name)
        check_port_free(cfg.listen_host, cfg.listen_port, "listen address", "--listen")
        for i in range(cfg.workers):
            check_port_free(*cfg.internal_addr(i), "internal address", "--internal")
        for name in (cfg.shm_name, cfg.counters_name):
            owner = segment.live_owner(name)
            if owner is not None:
                raise ConfigError(
                    f"shared memory /dev/shm/{name} is held by running process {owner}: "
                    f"stop that relay (relayctl stop --listen ...:{cfg.listen_port}) or kill it"
                )
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

    def start_worker(self, slot: WorkerSlot) -> None:
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

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        for slot in self.slots:
            self.start_worker(slot)
            self._watch(loop, slot)
        assert self.snapshotter is not None
        self.snapshotter.start()
        server = await asyncio.start_unix_server(
            self._serve_control, path=str(self.config.control_socket)
        )
        os.chmod(self.config.control_socket, 0o600)
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
            self.stopping = True
            server.close()
            for slot in self.slots:
                if slot.process is not None:
                    with contextlib.suppress(Exception):
                        loop.remove_reader(slot.process.sentinel)

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
                self.start_worker(slot)
                self._watch(loop, slot)

        loop.add_reader(sentinel, on_exit)

    # Control socket -------------------------------------------------------------------------
    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await control.read_message(reader)
            reply = self.handle(request.get("op", ""))
            await control.write_message(writer, reply)
        except Exception as exc:  # a broken client must not hurt the launcher
            log.debug("control connection failed: %s", exc)
        finally:
            writer.close()

    def handle(self, op: str) -> dict[str, Any]:
        if op == "status":
            return self.status()
        if op == "stats":
            return self.stats()
        if op == "stop":
            assert self._done is not None
            asyncio.get_running_loop().call_soon(self._done.set)
            return {"ok": True, "stopping": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "listen": f"{self.config.listen_host}:{self.config.listen_port}",
            "uptime": time.time() - self.started,
            "restored_flows": self.restored,
            "workers": [
                {
                    "index": s.index,
                    "pid": s.process.pid if s.process else None,
                    "alive": bool(s.process and s.process.is_alive()),
                    "restarts": s.restarts,
                    "internal": "{}:{}".format(*self.config.internal_addr(s.index)),
                }
                for s in self.slots
            ],
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
        self.stopping = True
        processes = [s.process for s in self.slots if s.process is not None]
        for p in processes:
            with contextlib.suppress(Exception):
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in processes:
            with contextlib.suppress(Exception):
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(1.0)
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


def start_background(config: RelayConfig, timeout: float = 10.0) -> int:
    """Start a detached launcher and wait until it answers; returns its pid.

    The launcher is this process, forked and detached (a new session, output to the log
    file): it starts with everything already imported, which is what keeps a restart short.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if control.is_running(config):
        raise ConfigError(
            f"a relay already runs on port {config.listen_port}: stop it with `relayctl stop`"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the launcher
        code = 1
        try:
            _detach(config.log_file)
            code = serve(config)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise ConfigError(_failure_line(config.log_file, os.waitstatus_to_exitcode(status)))
        if control.is_running(config):
            return pid
        time.sleep(0.005)
    os.kill(pid, signal.SIGTERM)
    raise ConfigError(f"relay did not come up within {timeout:.0f} s: see {config.log_file}")


def _detach(log_file: Path) -> None:
    """Leave the terminal's session; stdin from /dev/null, stdout and stderr to the log."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def restart(config: RelayConfig, timeout: float = 10.0) -> int:
    """Stop the relay on this port (if one runs) and start it again with `config`.

    Everything is imported before the old relay stops, so media pauses only for the old
    launcher's shutdown and the new one's start: the flows come back from the snapshot store.
    """
    with contextlib.suppress(control.ControlError):
        control.stop(config, timeout)
    return start_background(config, timeout)


def _failure_line(log_file: Path, code: int | None) -> str:
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {code}"
    return f"relay failed to start: {last.split('relayctl: ', 1)[-1]}"


def serve(config: RelayConfig) -> int:
    """Run a launcher in this process until stopped; 2 after a one-line config error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_foreground(config)
    except ConfigError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    """`python -m voicerelay.relay.launcher CONFIG_JSON` (how `relayctl up` runs one)."""
    return serve(config_from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
