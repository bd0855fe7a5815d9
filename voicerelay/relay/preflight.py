"""Everything a relay start can fail on, checked before any process is forked: each failure is
one `ConfigError` line naming the fix."""

from __future__ import annotations

import contextlib
import logging

from voicerelay.config import ConfigError, secret_path
from voicerelay.net import check_port_free
from voicerelay.relay import control
from voicerelay.relay.config import RelayConfig
from voicerelay.shm import segment
from voicerelay.wire.token import TokenError, load_keys, write_new_secret

log = logging.getLogger("voicerelay.launcher")
STOP_HINT = "stop it with `relayctl stop`"


def refuse_if_running(config: RelayConfig, hint: str = STOP_HINT) -> None:
    """ConfigError if a launcher already answers on this port's control socket."""
    if control.is_running(config):
        raise ConfigError(f"a relay already runs on port {config.listen_port}: {hint}")


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


def preflight(config: RelayConfig) -> None:
    """Check everything a launcher needs and clear what a dead one left behind (its control
    socket, pid file and shared memory); ConfigError on the first problem."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    refuse_if_running(config)
    for stale in (config.control_socket, config.pid_file):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    ensure_secret(config)
    for name in (config.shm_name, config.counters_name):
        if segment.clear_stale(name):
            log.warning("cleared stale shared memory %s left by a dead launcher", name)
    check_port_free(config.listen_host, config.listen_port, "listen address", "--listen")
    for i in range(config.workers):
        check_port_free(*config.internal_addr(i), "internal address", "--internal")
    for name in (config.shm_name, config.counters_name):
        owner = segment.live_owner(name)
        if owner is not None:
            raise ConfigError(
                f"shared memory /dev/shm/{name} is held by running process {owner}: "
                f"stop that relay (relayctl stop --listen ...:{config.listen_port}) or kill it"
            )
