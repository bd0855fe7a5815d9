"""`relayctl start | stop | stats | status`: run and inspect the relay."""

from __future__ import annotations

import functools
import ipaddress
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from voicerelay.relay.config import (
    DEFAULT_INTERNAL_PORT_BASE,
    DEFAULT_PUBLIC_PORT,
    ConfigError,
    RelayConfig,
    default_state_dir,
)


def parse_hostport(
    text: str,
    option: str,
    default_port: int | None = None,
    *,
    example_port: int | None = None,
    min_port: int = 1,
) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, or `HOST` when a default port exists.

    Errors (ConfigError, one line) name `option` and show an example with the option's own
    port (`example_port`, else `default_port`).
    """
    example = example_port or default_port or DEFAULT_PUBLIC_PORT
    text = text.strip()
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep or (":" in host and not host.startswith("[")):
        if default_port is None or (":" in text and not text.startswith("[")):
            raise ConfigError(
                f"{option} {text!r} is not HOST:PORT: write e.g. 127.0.0.1:{example} "
                f"or [::1]:{example}"
            )
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not port.isdigit():
        raise ConfigError(f"{option} {text!r} has no numeric port: write e.g. 127.0.0.1:{example}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{option} host {host!r} is not an IP address: write a literal such as "
            f"127.0.0.1:{example} or [::1]:{example}"
        ) from None
    return host, check_port(int(port), f"{option} port", min_port)


def check_port(port: int, what: str, min_port: int = 1) -> int:
    """`port` if it is a usable port number, else a one-line ConfigError naming `what`."""
    if not min_port <= port <= 65535:
        raise ConfigError(f"{what} {port} is out of range: use {min_port}-65535")
    return port


def usable_state_dir(path: Path) -> Path:
    """Create the state directory if needed; a one-line ConfigError if it cannot be used."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--state-dir {path} cannot be used ({exc.strerror}): choose a writable directory"
        ) from None
    return path


def relay_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by every relay verb (to find the launcher, or configure it)."""
    options = [
        click.option(
            "--listen",
            envvar="VOICERELAY_LISTEN",
            default=f"127.0.0.1:{DEFAULT_PUBLIC_PORT}",
            show_default=True,
            help="Public UDP address (HOST:PORT) clients send to.",
        ),
        click.option(
            "--state-dir",
            envvar="VOICERELAY_STATE_DIR",
            type=click.Path(path_type=Path),
            default=None,
            help="Secret, snapshot, pid and socket files [default: ~/.local/state/voicerelay].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def start_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--internal",
            envvar="VOICERELAY_INTERNAL",
            default=f"127.0.0.1:{DEFAULT_INTERNAL_PORT_BASE}",
            show_default=True,
            help="HOST:BASEPORT of the workers' sockets towards transceivers (worker i uses BASEPORT+i).",
        ),
        click.option(
            "--workers",
            envvar="VOICERELAY_WORKERS",
            type=int,
            default=None,
            help="Worker processes [default: one per core].",
        ),
        click.option(
            "--capacity",
            envvar="VOICERELAY_CAPACITY",
            type=int,
            default=65536,
            show_default=True,
            help="Flows per worker shard.",
        ),
        click.option(
            "--idle-timeout",
            envvar="VOICERELAY_IDLE_TIMEOUT",
            type=float,
            default=30.0,
            show_default=True,
            help="Seconds before a silent flow is dropped.",
        ),
        click.option(
            "--secret-file",
            envvar="VOICERELAY_SECRET_FILE",
            type=click.Path(path_type=Path),
            default=None,
            help="Routing-token keys [default: <state-dir>/secret.key, created if missing].",
        ),
        click.option(
            "--redis",
            "redis_url",
            envvar="VOICERELAY_REDIS",
            default=None,
            help="Snapshot to Redis (redis://host:port/db) instead of the local file.",
        ),
        click.option(
            "--snapshot-interval",
            envvar="VOICERELAY_SNAPSHOT_INTERVAL",
            type=float,
            default=1.0,
            show_default=True,
            help="Seconds between flow-table snapshots.",
        ),
        click.option(
            "--cluster-id",
            envvar="VOICERELAY_CLUSTER_ID",
            type=int,
            default=0,
            show_default=True,
            help="This cluster's id in routing tokens.",
        ),
        click.option(
            "--no-pin",
            is_flag=True,
            envvar="VOICERELAY_NO_PIN",
            help="Do not pin workers to cores.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(listen: str, state_dir: Path | None, **extra: Any) -> RelayConfig:
    """A validated RelayConfig from CLI values (ConfigError names the fix)."""
    host, port = parse_hostport(listen, "--listen", DEFAULT_PUBLIC_PORT)
    kwargs: dict[str, Any] = {"listen_host": host, "listen_port": port}
    if state_dir is not None:
        kwargs["state_dir"] = state_dir
    internal = extra.pop("internal", None)
    if internal is not None:
        kwargs["internal_host"], kwargs["internal_port_base"] = parse_hostport(
            internal, "--internal", example_port=DEFAULT_INTERNAL_PORT_BASE
        )
    if extra.pop("no_pin", False):
        kwargs["pin_cpus"] = False
    if extra.get("workers") is None:
        extra.pop("workers", None)
    kwargs.update(extra)
    return RelayConfig(**kwargs)


def _config_for_lookup(listen: str, state_dir: Path | None) -> RelayConfig:
    return build_config(listen, state_dir if state_dir is not None else default_state_dir())


@click.command()
@relay_options
@start_options
@click.option(
    "--foreground", is_flag=True, help="Run in this terminal instead of in the background."
)
def start(listen: str, state_dir: Path | None, foreground: bool, **options: Any) -> None:
    """Start the relay: a launcher and one worker per core on one public UDP port."""
    from voicerelay.relay import launcher

    config = build_config(listen, state_dir, **options)
    usable_state_dir(config.state_dir)
    launcher.ensure_secret(config)  # a missing --secret-file fails here, in one line
    if foreground:
        import logging

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        launcher.run_foreground(config)
        return
    pid = launcher.start_background(config)
    click.echo(
        f"relay started on {config.listen_host}:{config.listen_port} "
        f"with {config.workers} workers (pid {pid}); log: {config.log_file}"
    )


@click.command()
@relay_options
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait.")
def stop(listen: str, state_dir: Path | None, timeout: float) -> None:
    """Stop the relay: workers, final snapshot, shared memory removed."""
    from voicerelay.relay import control

    config = _config_for_lookup(listen, state_dir)
    try:
        stopped = control.stop(config, timeout)
    except control.ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if not stopped:
        raise click.ClickException(f"no relay runs on port {config.listen_port}")
    click.echo(f"relay on port {config.listen_port} stopped")


def _request(config: RelayConfig, op: str) -> dict[str, Any]:
    from voicerelay.relay import control

    try:
        return control.request(config, op)
    except control.ControlError:
        raise click.ClickException(
            f"no relay runs on port {config.listen_port}: start one with `relayctl start`"
        ) from None


@click.command()
@relay_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(listen: str, state_dir: Path | None, as_json: bool) -> None:
    """Is the relay up: launcher pid, workers, restarts."""
    reply = _request(_config_for_lookup(listen, state_dir), "status")
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(f"relay {reply['listen']} up {reply['uptime']:.0f} s, launcher pid {reply['pid']}")
    for w in reply["workers"]:
        click.echo(
            f"  worker {w['index']}: pid {w['pid']} {'alive' if w['alive'] else 'DOWN'}, "
            f"restarts {w['restarts']}, internal {w['internal']}"
        )


def format_stats(reply: dict[str, Any]) -> str:
    """The human table of `relayctl stats`."""
    lines = [
        f"relay {reply['listen']}  launcher pid {reply['pid']}  flows in table {reply['table_flows']}"
    ]
    head = f"{'worker':>6} {'pid':>7} {'pkts in':>10} {'bytes in':>12} {'pkts out':>10} {'bytes out':>12} {'flows':>7}  drops"
    lines.append(head)
    rows = [*reply["workers"], {"index": "total", "pid": "", "counters": reply["totals"]}]
    for w in rows:
        c = w["counters"]
        drops = (
            ", ".join(f"{k[5:]}={v}" for k, v in c.items() if k.startswith("drop_") and v) or "-"
        )
        lines.append(
            f"{w['index']!s:>6} {w['pid']!s:>7} {c['packets_in']:>10} {c['bytes_in']:>12} "
            f"{c['packets_out']:>10} {c['bytes_out']:>12} {c['flows']:>7}  {drops}"
        )
    snap = reply.get("snapshot") or {}
    if snap:
        last_ok = snap.get("last_ok")
        age = f"{time.time() - last_ok:.1f} s ago" if last_ok else "never"
        lines.append(
            f"snapshot: {snap.get('target')}  last good {age}, "
            f"{snap.get('flows_in_last_snapshot')} flows, failures {snap.get('failures')}"
            + (f", last error: {snap['last_error']}" if snap.get("consecutive_failures") else "")
        )
    return "\n".join(lines)


@click.command()
@relay_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def stats(listen: str, state_dir: Path | None, as_json: bool, watch: bool) -> None:
    """Per-worker packets and bytes each way, flows, drops by reason, snapshot state."""
    config = _config_for_lookup(listen, state_dir)
    show: Callable[[dict[str, Any]], str] = (
        functools.partial(json.dumps, indent=2) if as_json else format_stats
    )
    while True:
        reply = _request(config, "stats")
        if watch:
            click.clear()
        click.echo(show(reply))
        if not watch:
            return
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return


@click.command()
@relay_options
@start_options
def restart(listen: str, state_dir: Path | None, **options: Any) -> None:
    """Stop the relay and start it again: flows come back from the snapshot, calls go on."""
    from voicerelay.relay import launcher

    config = build_config(listen, state_dir, **options)
    usable_state_dir(config.state_dir)  # fail on a bad option before the running relay stops
    launcher.ensure_secret(config)
    pid = launcher.restart(config)
    click.echo(
        f"relay restarted on {config.listen_host}:{config.listen_port} "
        f"with {config.workers} workers (pid {pid}); log: {config.log_file}"
    )


commands: list[click.Command] = [start, stop, restart, stats, status]
