"""`relayctl up` as a user runs it, on free ports with its own state directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.netns import url_host
from tests.support.procs import (
    RELAYCTL,
    RelayProcess,
    TransceiverProcess,
    free_ports,
    wait_for,
)
from voicerelay.wire.token import write_new_secret


class UpStack:
    """`relayctl up` on free ports; `app` is "echo" (the default here) or "agent"."""

    def __init__(self, state_dir: Path, app: str = "echo", extra: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.app = app
        self.extra = list(extra or [])  # more `relayctl up` options
        self.agent_port = free_ports(1, socket.SOCK_STREAM)
        self.public_port = free_ports(1)
        self.internal_base = free_ports(2)
        self.transceiver_port = free_ports(1)
        self.http_port = free_ports(1, socket.SOCK_STREAM)
        bind = self.extra[self.extra.index("--bind") + 1] if "--bind" in self.extra else "127.0.0.1"
        self.url = f"http://{url_host(bind)}:{self.http_port}"  # signaling listens on --bind
        self.output = state_dir / "up.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> UpStack:
        env = {**os.environ, "VOICERELAY_STATE_DIR": str(self.state_dir)}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *RELAYCTL,
                    "up",
                    "--public-port",
                    str(self.public_port),
                    "--internal-port-base",
                    str(self.internal_base),
                    "--transceiver-port",
                    str(self.transceiver_port),
                    "--http-port",
                    str(self.http_port),
                    "--workers",
                    "2",
                    "--app",
                    self.app,
                    "--agent-port",
                    str(self.agent_port),
                    # Explicit addresses: a test never advertises this machine's interfaces.
                    *(() if "--bind" in self.extra else ("--bind", "127.0.0.1")),
                    *(() if "--advertise" in self.extra else ("--advertise", "127.0.0.1")),
                    *self.extra,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as in a terminal
            )
        wait_for(
            self._ready, 20 if self.app == "echo" else 90, 0.05, "relayctl up to serve the page"
        )
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"relayctl up exited: {self.output.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def interrupt(self) -> int:
        """SIGINT to `relayctl up` alone; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(20)

    def ctrl_c(self) -> int:
        """What Ctrl-C in a terminal does: SIGINT to the whole foreground process group."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(20)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for name in (
            f"voicerelay-{self.public_port}-flows",
            f"voicerelay-{self.public_port}-stats",
        ):
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")


@pytest.fixture
def up_stack(tmp_path):
    stack = UpStack(tmp_path / "state").start()
    yield stack
    stack.cleanup()


@pytest.fixture
def no_relay(tmp_path):
    """Signaling (and the page) up, but nothing behind the relay address its answers name:
    offers get answers, ICE never connects."""
    relay = RelayProcess(tmp_path / "state")  # never started: its public port stays closed
    write_new_secret(relay.secret_file)
    with TransceiverProcess(relay) as transceiver:
        yield transceiver
