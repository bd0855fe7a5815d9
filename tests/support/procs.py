"""Real processes for tests: a relay (`relayctl start`), a transceiver, a redis-server.

Every helper picks free loopback ports, owns its own state directory, polls for readiness with
a deadline (no fixed sleeps), and always cleans up: processes, sockets, shared memory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

RELAYCTL = [sys.executable, "-m", "voicerelay.cli.main"]


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_free(kind: int, port: int) -> bool:
    """Can a socket of `kind` bind 127.0.0.1:`port` now?"""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1, kind: int = socket.SOCK_DGRAM) -> int:
    """A base port such that `count` consecutive ports are free (UDP and TCP)."""
    for _ in range(500):
        base = random.randrange(20000, 60000 - count)
        if all(
            port_free(kind, base + i) and port_free(socket.SOCK_STREAM, base + i)
            for i in range(count)
        ):
            return base
    raise RuntimeError("no free ports")


class RelayProcess:
    """A real relay launched with `relayctl start` (background mode) in its own state dir."""

    def __init__(
        self,
        state_dir: Path,
        *,
        workers: int = 2,
        port: int | None = None,
        internal_base: int | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.workers = workers
        self.port = port or free_ports(1)
        self.internal_base = internal_base or free_ports(workers)
        self.extra = list(extra or [])
        self.env = {**os.environ, "VOICERELAY_STATE_DIR": str(self.state_dir)}

    @property
    def public(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def secret_file(self) -> Path:
        return self.state_dir / "secret.key"

    @property
    def shm_names(self) -> list[str]:
        return [f"voicerelay-{self.port}-flows", f"voicerelay-{self.port}-stats"]

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess:
        cmd = [*RELAYCTL, *args, "--listen", f"127.0.0.1:{self.port}"]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def start(self) -> RelayProcess:
        self.ctl(
            "start",
            "--internal",
            f"127.0.0.1:{self.internal_base}",
            "--workers",
            str(self.workers),
            *self.extra,
        )
        return self

    def stop(self) -> None:
        self.ctl("stop", check=False)

    def request(self, op: str) -> dict[str, Any]:
        """Ask the launcher directly over its control socket (what `relayctl` does)."""
        from voicerelay.relay import control
        from voicerelay.relay.config import RelayConfig

        config = RelayConfig(listen_port=self.port, state_dir=self.state_dir)
        return control.request(config, op)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def launcher_pid(self) -> int:
        return int((self.state_dir / f"relay-{self.port}.pid").read_text())

    def client_socket(self, host: str = "127.0.0.1") -> socket.socket:
        """A UDP socket bound to an address no flow of this relay uses. The kernel hands out
        ephemeral ports at random, so a new client of a long-lived relay may get the port of an
        earlier test's client, whose established flow it would inherit (and a check of its own
        would be refused as a rebind)."""
        from voicerelay.shm.flowtable import FlowTable

        table = FlowTable.attach(self.shm_names[0])
        taken: list[socket.socket] = []
        try:
            while True:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((host, 0))
                if table.lookup(sock.getsockname()) is None:
                    return sock
                taken.append(sock)  # held until a free one is found, so it is not handed again
        finally:
            table.close()
            for sock in taken:
                sock.close()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def kill_all(self) -> None:
        """SIGKILL the launcher and every worker at once (a crash, not a stop)."""
        pids = [self.launcher_pid(), *self.worker_pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_for(lambda p=pid: not _alive(p), 5, what=f"pid {pid} to die")

    def cleanup(self) -> None:
        """Stop if running; kill anything left; remove shared memory."""
        with contextlib.suppress(Exception):
            self.stop()
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            launched = "voicerelay.relay.launcher" in cmd and f'"listen_port": {self.port}' in cmd
            started = "voicerelay.cli.main" in cmd and f":{self.port}" in cmd and " start" in cmd
            if launched or started:  # a launcher run as `-m ...launcher` or forked by `start`
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        for name in self.shm_names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TransceiverProcess:
    """A real transceiver (`relayctl transceiver`) sharing a relay's secret."""

    def __init__(
        self,
        relay: RelayProcess,
        *,
        consent_timeout: float = 30.0,
        extra: list[str] | None = None,
    ) -> None:
        self.relay = relay
        self.extra = list(extra or [])  # more `relayctl transceiver` options
        self.internal_port = free_ports(1)
        self.http_port = free_ports(1, socket.SOCK_STREAM)
        self.consent_timeout = consent_timeout
        self.proc: subprocess.Popen | None = None
        self.log = relay.state_dir / f"transceiver-{self.http_port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def internal(self) -> tuple[str, int]:
        return ("127.0.0.1", self.internal_port)

    def start(self) -> TransceiverProcess:
        import urllib.request

        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    *RELAYCTL,
                    "transceiver",
                    "--internal",
                    f"127.0.0.1:{self.internal_port}",
                    "--http",
                    f"127.0.0.1:{self.http_port}",
                    "--relay-public",
                    f"127.0.0.1:{self.relay.port}",
                    "--secret-file",
                    str(self.relay.secret_file),
                    "--consent-timeout",
                    str(self.consent_timeout),
                    *self.extra,
                ],
                env=self.relay.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"transceiver exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=0.5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 15, 0.05, "transceiver signaling")
        return self

    def stats(self) -> dict[str, Any]:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + "/v1/stats", timeout=2) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # stop now (SIGTERM would drain the calls)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> TransceiverProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A real Debian `redis-server` on a free loopback port, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `make install` (scripts/install-system-deps.sh)"
            )
        self.workdir = Path(workdir)
        self.port = free_ports(1, socket.SOCK_STREAM)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def pong() -> bool:
            try:
                return bool(self.client().ping())
            except Exception:
                return False

        wait_for(pong, 10, 0.02, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
