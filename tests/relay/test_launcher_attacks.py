"""The launcher and `relayctl` under abuse and mistakes (issue 11): a foreground start on a busy
port, state files other users could read, and inputs that used to end in a traceback.

Each test runs the real `relayctl` in a subprocess (the signaling server of the `call` test is a
real aiohttp server on loopback)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.support.procs import RELAYCTL, RelayProcess, free_ports, wait_for
from voicerelay.wire.token import write_new_secret


def one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line a failure must produce: no traceback, the expected exit code."""
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# start --foreground on a busy port -----------------------------------------------------------


def test_start_foreground_on_a_running_relays_port_leaves_that_relay_alone(tmp_path):
    """It fails with the one line, and the running relay still answers status and stop."""
    with RelayProcess(tmp_path, workers=1) as relay:
        pid = relay.launcher_pid()
        result = relay.ctl("start", "--foreground", "--workers", "1", check=False)
        assert "a relay already runs on port" in one_line(result)
        assert (tmp_path / f"relay-{relay.port}.sock").exists()
        assert relay.launcher_pid() == pid  # its pid file is still there and still its own
        assert relay.status()["pid"] == pid
        assert relay.ctl("status").returncode == 0
        assert "stopped" in relay.ctl("stop").stdout
        assert not (tmp_path / f"relay-{relay.port}.pid").exists()  # stop found it and ended it


def test_start_foreground_on_a_port_a_stranger_holds_removes_nothing_of_ours(tmp_path):
    """The other way round: no relay answers, the port is busy; the failed start leaves the
    files it found (a log) and removes only what it created itself."""
    port = free_ports(1)
    state = tmp_path / "state"
    state.mkdir()
    log = state / f"relay-{port}.log"
    log.write_text("an earlier run\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        result = subprocess.run(
            [*RELAYCTL, "start", "--foreground", "--listen", f"127.0.0.1:{port}", "--workers", "1"],
            env={**os.environ, "VOICERELAY_STATE_DIR": str(state)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert "--listen" in one_line(result) and "in use" in result.stderr
    assert log.read_text() == "an earlier run\n"
    assert not (state / f"relay-{port}.pid").exists()
    assert not (state / f"relay-{port}.sock").exists()


# State files ---------------------------------------------------------------------------------


def test_state_files_are_private_and_world_readable_ones_are_fixed_at_start(tmp_path):
    """Secret, snapshot (client addresses), pid, log and control socket: mode 0600, including
    files an older version left readable by everyone."""
    relay = RelayProcess(tmp_path, workers=1, extra=["--snapshot-interval", "0.1"])
    write_new_secret(relay.secret_file)
    snapshot = tmp_path / f"relay-{relay.port}.snapshot"
    log = tmp_path / f"relay-{relay.port}.log"
    for path in (relay.secret_file, snapshot, log):
        path.touch()
        path.chmod(0o644)
    try:
        relay.start()
        files = {
            "secret": relay.secret_file,
            "snapshot": snapshot,
            "pid": tmp_path / f"relay-{relay.port}.pid",
            "log": log,
            "socket": tmp_path / f"relay-{relay.port}.sock",
        }
        assert {name: oct(mode(path)) for name, path in files.items()} == {
            name: oct(0o600) for name in files
        }
        snapshots = relay.stats()["snapshot"]["snapshots"]
        wait_for(lambda: relay.stats()["snapshot"]["snapshots"] > snapshots, 5, what="a snapshot")
        assert mode(snapshot) == 0o600  # a snapshot written since is private too
    finally:
        relay.cleanup()


def test_a_fresh_state_directory_gets_private_files(tmp_path):
    state = tmp_path / "fresh"
    with RelayProcess(state, workers=1, extra=["--snapshot-interval", "0.1"]) as relay:
        wait_for(lambda: relay.stats()["snapshot"]["snapshots"] >= 1, 5, what="a snapshot")
        for name in ("secret.key", f"relay-{relay.port}.snapshot", f"relay-{relay.port}.log"):
            assert mode(state / name) == 0o600, name


# Tracebacks that are one line now ------------------------------------------------------------


@pytest.mark.parametrize("foreground", [False, True])
@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("redis://127.0.0.1:notaport/0", "has no numeric port"),
        ("redis://127.0.0.1:99999/0", "port 99999 is out of range"),
        ("redis://127.0.0.1:6379/zero", "database 'zero' is not a number"),
    ],
)
def test_a_redis_url_with_a_bad_port_or_database_is_one_line(tmp_path, url, fix, foreground):
    port = free_ports(1)
    args = ["start", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--redis", url]
    result = subprocess.run(
        [*RELAYCTL, *args, *(["--foreground"] if foreground else [])],
        env={**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    line = one_line(result)
    assert fix in line and "redis://host:port/db" in line
    log = tmp_path / f"relay-{port}.log"
    assert not log.exists() or "Traceback" not in log.read_text()


class FakeSignaling:
    """A real HTTP server on loopback that answers every POST /v1/sessions with `status`,
    `body` and (optionally) a Location: what a broken or hostile signaling server does."""

    def __init__(self, status: int, body: str, location: str | None) -> None:
        self.status, self.body, self.location = status, body, location
        self.port = free_ports(1, socket.SOCK_STREAM)
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: object = None

    def _run(self) -> None:
        import asyncio

        from aiohttp import web

        async def post(request: web.Request) -> web.Response:
            await request.read()
            headers = {"Location": self.location} if self.location else {}
            return web.Response(status=self.status, text=self.body, headers=headers)

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/sessions", post)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._stop = lambda: loop.call_soon_threadsafe(stop.set)
            self.ready.set()
            await stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> FakeSignaling:
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()  # type: ignore[operator]
        self._thread.join(5)


@pytest.fixture
def signaling(request) -> Iterator[FakeSignaling]:
    with FakeSignaling(*request.param) as server:
        yield server


@pytest.mark.parametrize(
    ("signaling", "says"),
    [
        (
            (201, "hello, this is not SDP", "/v1/sessions/x"),
            "signaling answered 201 but the body is not an SDP answer",
        ),
        (
            (201, "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "/v1/sessions/x"),
            "signaling answered 201 but the body is not an SDP answer",
        ),
        ((201, "v=0\r\n", None), "signaling answered 201 without a Location header"),
    ],
    indirect=["signaling"],
)
def test_relayctl_call_against_a_201_that_is_not_an_answer_is_one_line(tmp_path, signaling, says):
    result = subprocess.run(
        [*RELAYCTL, "call", f"http://127.0.0.1:{signaling.port}", "--timeout", "2"],
        env={**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, lines)
    assert lines[0].startswith(f"call failed: {says}"), lines[0]


# The pid-file claim ----------------------------------------------------------------------------


def test_the_pid_file_claims_the_port_for_the_life_of_its_holder(tmp_path):
    """A held pid file refuses a second claim whatever it holds; a stale one (no holder, as a
    crashed launcher leaves it) is simply taken over."""
    from voicerelay.config import ConfigError
    from voicerelay.relay.config import RelayConfig
    from voicerelay.relay.preflight import PidFile

    config = RelayConfig(listen_port=40003, state_dir=tmp_path, workers=1)
    config.pid_file.write_text("999999\n")  # stale: nobody holds it
    config.pid_file.chmod(0o644)
    first = PidFile.acquire(config)
    assert config.pid_file.read_text() == f"{os.getpid()}\n"
    assert mode(config.pid_file) == 0o600
    with pytest.raises(ConfigError, match=f"already runs on port 40003 \\(pid {os.getpid()}\\)"):
        PidFile.acquire(config)
    assert config.pid_file.read_text() == f"{os.getpid()}\n"  # the refused claim changed nothing
    first.release()
    assert not config.pid_file.exists()
    PidFile.acquire(config).release()
