"""Everything a relay start can fail on, checked before any process is forked: each failure is
one `ConfigError` line naming the fix. Also the launcher's claim on its port (`PidFile`, held
for its whole life) and its state files' privacy (mode 0600)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

from voicerelay.config import ConfigError, secret_path
from voicerelay.net import check_port_free
from voicerelay.relay import control
from voicerelay.relay.config import RelayConfig
from voicerelay.shm import segment
from voicerelay.wire.token import TokenError, load_keys, write_new_secret

log = logging.getLogger("voicerelay.launcher")
STOP_HINT = "stop it with `relayctl stop`"
PRIVATE = 0o600  # every state file: the secret, client addresses in snapshots and logs


def refuse_if_running(config: RelayConfig, hint: str = STOP_HINT) -> None:
    """ConfigError if a launcher already answers on this port's control socket."""
    if control.is_running(config):
        raise ConfigError(f"a relay already runs on port {config.listen_port}: {hint}")


def open_private(path: Path, flags: int) -> int:
    """`os.open` a state file, created 0600 and made 0600 if it was not."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE)
    with contextlib.suppress(OSError):  # not ours to change (then the owner is warned below)
        os.fchmod(fd, PRIVATE)
    return fd


class PidFile:
    """The launcher's pid file, locked (flock) for as long as the launcher lives.

    A second launcher for the same port and state directory finds the lock held and is
    refused, whether the first one already answers or is still starting; a file whose launcher
    died is unlocked, so it is told apart from a live one without guessing from pids.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, config: RelayConfig) -> PidFile:
        """Lock this port's pid file and write this process's pid into it; ConfigError naming
        the running launcher if another one holds it."""
        path = config.pid_file
        try:
            fd = open_private(path, os.O_RDWR)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the pid file {path} ({exc.strerror}): choose a writable --state-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"a relay already runs on port {config.listen_port} (pid {holder}): {STOP_HINT}"
            ) from None
        except OSError as exc:  # a file system without locks (ENOLCK)
            os.close(fd)
            raise ConfigError(
                f"cannot lock the pid file {path} ({exc.strerror}): choose a local --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def fileno(self) -> int:
        """The locked descriptor (a forked worker closes its copy: the lock is the launcher's)."""
        assert self._fd is not None
        return self._fd

    def release(self) -> None:
        """Remove the file while still holding it, then let go."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def ensure_secret(config: RelayConfig) -> None:
    """Create the default secret (<state-dir>/secret.key) on first start; fail in one line if
    the secret does not load.

    Only the default is ever created. A secret file named explicitly (--secret-file or
    VOICERELAY_SECRET_FILE) must already exist: inventing a fresh key there would make the relay
    reject every token the cluster's transceivers seal with the real one.
    """
    path = config.secret_path
    default = secret_path(config.state_dir)
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


def make_private(path: Path, *, others_only: bool = False) -> None:
    """Take away access a state file gives beyond its owner (or only "other" users': an
    explicit --secret-file may be shared with a transceiver through its group); one log line
    when a mode changes or cannot be changed."""
    try:
        old = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    new = old & ~0o007 if others_only else old & ~0o077
    if new == old:
        return
    try:
        path.chmod(new)
    except OSError as exc:
        log.warning("%s is readable by other users and stays so: %s", path, exc.strerror)
        return
    log.warning("%s was mode %04o: now %04o (state files are private)", path, old, new)


def secure_state_files(config: RelayConfig) -> None:
    """Fix the modes of state files an earlier version (or a person) left readable by others."""
    explicit = config.secret_file is not None and config.secret_path != secret_path(
        config.state_dir
    )
    make_private(config.secret_path, others_only=explicit)
    for path in (config.snapshot_file, config.log_file):
        make_private(path)


def preflight(config: RelayConfig) -> PidFile:
    """Check everything a launcher needs, claim the port (the returned `PidFile`, locked) and
    clear what a dead launcher left behind (its control socket and shared memory); ConfigError
    on the first problem, with nothing of another launcher touched."""
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    refuse_if_running(config)
    pid_file = PidFile.acquire(config)
    try:
        _check(config)
    except BaseException:
        pid_file.release()
        raise
    return pid_file


def _check(config: RelayConfig) -> None:
    """Preflight with the port claimed: whatever is left of another launcher here is stale."""
    with contextlib.suppress(FileNotFoundError):
        config.control_socket.unlink()
    ensure_secret(config)
    for name in (config.shm_name, config.counters_name):
        if segment.clear_stale(name):
            log.warning("cleared stale shared memory %s left by a dead launcher", name)
    check_port_free(config.listen_host, config.listen_port, "listen address", "--listen")
    for i in range(config.workers):
        check_port_free(*config.internal_addr(i), "internal address", "--internal")
    if config.tcp_port:
        check_port_free(config.listen_host, config.tcp_port, "TCP port", "--tcp-port", tcp=True)
    for name in (config.shm_name, config.counters_name):
        owner = segment.live_owner(name)
        if owner is not None:
            raise ConfigError(
                f"shared memory /dev/shm/{name} is held by running process {owner}: "
                f"stop that relay (relayctl stop --listen ...:{config.listen_port}) or kill it"
            )
    secure_state_files(config)  # last: a start that fails changes nothing
