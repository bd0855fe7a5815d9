"""Starting a launcher in another process and waiting until it answers: detached in the
background (`start_background`, `restart`) or as a child that dies with its parent
(`start_child`, what `relayctl up` runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from voicerelay.config import ConfigError
from voicerelay.process import die_with_parent
from voicerelay.relay import control, launcher
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.preflight import open_private, refuse_if_running

POLL = 0.005  # seconds between "does it answer yet" checks


def failure_line(log_file: Path, code: int | None) -> str:
    """Why a launcher exited before it answered: the last line of its log, in one line."""
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {code}"
    return f"relay failed to start: {last.split('relayctl: ', 1)[-1]}"


def wait_until_answering(
    config: RelayConfig,
    exit_code: Callable[[], int | None],
    stop: Callable[[], None],
    timeout: float,
) -> None:
    """Poll until the launcher of `config` answers on its control socket.

    `exit_code()` is the launcher process's exit code once it has exited, else None. If it
    exits first: ConfigError with the last line of its log. If `timeout` passes first: `stop()`,
    then ConfigError naming the log.
    """
    deadline = time.monotonic() + timeout
    while not control.is_running(config):
        code = exit_code()
        if code is not None:
            raise ConfigError(failure_line(config.log_file, code))
        if time.monotonic() > deadline:
            stop()
            raise ConfigError(
                f"relay did not come up within {timeout:.0f} s: see {config.log_file}"
            )
        time.sleep(POLL)


def start_background(config: RelayConfig, timeout: float = 10.0) -> int:
    """Start a detached launcher and wait until it answers; returns its pid.

    The launcher is this process, forked and detached (a new session, output to the log
    file): it starts with everything already imported, which is what keeps a restart short.
    """
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    refuse_if_running(config)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the launcher
        code = 1
        try:
            _detach(config.log_file)
            code = launcher.serve(config)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    def exit_code() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None

    wait_until_answering(config, exit_code, lambda: os.kill(pid, signal.SIGTERM), timeout)
    return pid


def restart(config: RelayConfig, timeout: float = 10.0) -> int:
    """Stop the relay on this port (if one runs) and start it again with `config`.

    Everything is imported before the old relay stops, so media pauses only for the old
    launcher's shutdown and the new one's start: the flows come back from the snapshot store.
    """
    with contextlib.suppress(control.ControlError):
        control.stop(config, timeout)
    return start_background(config, timeout)


def start_child(config: RelayConfig, timeout: float = 15.0) -> subprocess.Popen:
    """A launcher as a child process (`python -m voicerelay.relay.launcher CONFIG_JSON`, dying
    with this one), once it answers."""
    with os.fdopen(open_private(config.log_file, os.O_WRONLY | os.O_APPEND), "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "voicerelay.relay.launcher", config.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    wait_until_answering(config, child.poll, child.kill, timeout)
    return child


def _detach(log_file: Path) -> None:
    """Leave the terminal's session; stdin from /dev/null, stdout and stderr to the log (0600:
    it names client addresses)."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    log = open_private(log_file, os.O_WRONLY | os.O_APPEND)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
