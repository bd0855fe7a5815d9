"""`relayctl start | stop | restart | stats | status`: run and inspect the relay."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from voicerelay.addresses import format_addr, is_wildcard
from voicerelay.cli.options import (
    cluster_id_option,
    kernel_fast_path_option,
    options,
    parse_hostport,
    secret_file_option,
    state_dir_option,
    usable_state_dir,
    workers_option,
)
from voicerelay.config import (
    DEFAULT_HOST,
    DEFAULT_INTERNAL_PORT_BASE,
    DEFAULT_PUBLIC_PORT,
    default_state_dir,
)
from voicerelay.relay.config import DEFAULT_TRANSCEIVER_NETWORKS, RelayConfig

# The options of every relay verb (to find the launcher, or configure it).
relay_options = options(
    click.option(
        "--listen",
        envvar="VOICERELAY_LISTEN",
        default=f"{DEFAULT_HOST}:{DEFAULT_PUBLIC_PORT}",
        show_default=True,
        help="Public UDP address (HOST:PORT) clients send to.",
    ),
    state_dir_option("Secret, snapshot, pid and socket files"),
)

# The options that configure a relay (`start`, `restart`).
start_options = options(
    click.option(
        "--internal",
        envvar="VOICERELAY_INTERNAL",
        default=f"{DEFAULT_HOST}:{DEFAULT_INTERNAL_PORT_BASE}",
        show_default=True,
        help="HOST:BASEPORT of the workers' sockets towards transceivers (worker i uses BASEPORT+i).",
    ),
    workers_option("Worker processes"),
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
        help="Seconds before a flow whose transceiver went silent is dropped.",
    ),
    click.option(
        "--token-window",
        envvar="VOICERELAY_TOKEN_WINDOW",
        type=float,
        default=RelayConfig.token_window,
        show_default=True,
        help="Seconds after issue within which a routing token may open its first flow "
        "(relay and transceiver clocks must agree this closely).",
    ),
    click.option(
        "--token-clients",
        envvar="VOICERELAY_TOKEN_CLIENTS",
        type=int,
        default=RelayConfig.token_clients,
        show_default=True,
        help="Client addresses one routing token may open flows for (per worker).",
    ),
    click.option(
        "--new-flow-rate",
        envvar="VOICERELAY_NEW_FLOW_RATE",
        type=float,
        default=RelayConfig.new_flow_rate,
        show_default=True,
        help="New flows a second per source prefix (/24, /64) and worker; 0: no limit.",
    ),
    click.option(
        "--new-flow-burst",
        envvar="VOICERELAY_NEW_FLOW_BURST",
        type=int,
        default=RelayConfig.new_flow_burst,
        show_default=True,
        help="New flows a source prefix may open at once before --new-flow-rate applies.",
    ),
    click.option(
        "--rebind-after",
        envvar="VOICERELAY_REBIND_AFTER",
        type=float,
        default=RelayConfig.rebind_after,
        show_default=True,
        help="Seconds a flow's return traffic must be silent before a new token moves it "
        "to another transceiver.",
    ),
    click.option(
        "--unanswered-timeout",
        envvar="VOICERELAY_UNANSWERED_TIMEOUT",
        type=float,
        default=RelayConfig.unanswered_timeout,
        show_default=True,
        help="Seconds a flow that never carried return traffic lives, whatever its client sends.",
    ),
    click.option(
        "--tcp-port",
        envvar="VOICERELAY_TCP_PORT",
        type=int,
        default=RelayConfig.tcp_port,
        show_default=True,
        help="Also accept ICE over TCP (RFC 6544, RFC 4571 framing) on this port of the listen "
        "address, every worker (443 for clients behind firewalls that block UDP); 0: off. "
        "Transceivers must advertise it (relayctl transceiver --tcp-port).",
    ),
    click.option(
        "--tcp-connections",
        envvar="VOICERELAY_TCP_CONNECTIONS",
        type=int,
        default=RelayConfig.tcp_connections,
        show_default=True,
        help="TCP connections one worker keeps at most (those that have not opened a flow yet "
        "give way first).",
    ),
    secret_file_option("[default: <state-dir>/secret.key, created if missing]"),
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
    cluster_id_option(),
    click.option(
        "--transceiver-networks",
        envvar="VOICERELAY_TRANSCEIVER_NETWORKS",
        default=",".join(DEFAULT_TRANSCEIVER_NETWORKS),
        show_default=True,
        help="CIDR networks (comma-separated) transceivers live in: a restored flow naming "
        "a transceiver elsewhere refuses the snapshot.",
    ),
    click.option(
        "--cluster-routes",
        envvar="VOICERELAY_CLUSTER_ROUTES",
        default="",
        help="Other clusters' relay ingresses, ID=HOST:PORT[,ID=HOST:PORT...]: a token naming "
        "one of them is forwarded there (the global hop) [default: none].",
    ),
    click.option(
        "--hop-limit",
        envvar="VOICERELAY_HOP_LIMIT",
        type=click.IntRange(0, 1),
        default=1,
        show_default=True,
        help="Relay-to-relay hops a datagram may take: 0 turns the global hop off (no "
        "forwarding to routes, no envelopes from upstream relays).",
    ),
    click.option(
        "--hop-peers",
        envvar="VOICERELAY_HOP_PEERS",
        default="",
        help="CIDR networks of the upstream (edge) relays whose hop envelopes this relay takes "
        "[default: none: an envelope names its client, so only trusted relays may send one].",
    ),
    kernel_fast_path_option(),
    click.option(
        "--no-pin",
        is_flag=True,
        envvar="VOICERELAY_NO_PIN",
        help="Do not pin workers to cores.",
    ),
    click.option(
        "--metrics",
        envvar="VOICERELAY_METRICS",
        default=None,
        help="Serve Prometheus /metrics, /healthz and /readyz on HOST:PORT from the launcher "
        "[default: off].",
    ),
)


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
    metrics = extra.pop("metrics", None)
    if metrics:
        kwargs["metrics_host"], kwargs["metrics_port"] = parse_hostport(
            metrics, "--metrics", example_port=9100, min_port=0
        )
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
    from voicerelay.process import configure_logging
    from voicerelay.relay import launcher, spawn
    from voicerelay.relay.preflight import ensure_secret

    config = build_config(listen, state_dir, **options)
    usable_state_dir(config.state_dir)
    ensure_secret(config)  # a missing --secret-file fails here, in one line
    if config.tcp_port:
        from voicerelay.net import check_port_free
        from voicerelay.relay.preflight import refuse_if_running

        refuse_if_running(config)  # the one error for a relay already running, before ports
        check_port_free(config.listen_host, config.tcp_port, "TCP port", "--tcp-port", tcp=True)
    if foreground:
        configure_logging()
        launcher.run_foreground(config)
        return
    pid = spawn.start_background(config)
    click.echo(
        f"relay started on {format_addr((config.listen_host, config.listen_port))} "
        f"with {config.workers} workers (pid {pid}); log: {config.log_file}"
        + (f"\n  ICE over TCP on port {config.tcp_port}" if config.tcp_port else "")
        + fast_path_note(config)
        + wildcard_note(config.listen_host)
    )


def fast_path_note(config: RelayConfig) -> str:
    """For `--kernel-fast-path`: the line saying whether the kernel forwards, and if not why."""
    if not config.kernel_fast_path:
        return ""
    state = _request(config, "status").get("fast_path", "off")
    if state.startswith("off"):
        return f"\n  kernel fast path {state}; forwarding in userspace"
    return f"\n  kernel fast path {state}"


def wildcard_note(host: str) -> str:
    """For a relay bound to every address: what transceivers must advertise instead."""
    if not is_wildcard(host):
        return ""
    return (
        "\n  it binds every address: give transceivers the ones clients reach "
        "(relayctl transceiver --relay-public HOST:PORT[,HOST:PORT...])"
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
    if reply.get("fast_path", "off") != "off":
        click.echo(f"  kernel fast path {reply['fast_path']}")
    for w in reply["workers"]:
        click.echo(
            f"  worker {w['index']}: pid {w['pid']} {'alive' if w['alive'] else 'DOWN'}, "
            f"restarts {w['restarts']}, internal {w['internal']}" + _worker_trouble(w)
        )


def _worker_trouble(worker: dict[str, Any]) -> str:
    """What `status` adds for a worker that is backing off, or that exited before."""
    if worker.get("state") == "backoff":
        return (
            f"; backing off, next start in {worker['retry_in']:.1f} s "
            f"({worker['early_exits']} early exits in a row): {worker['last_exit']}"
        )
    if worker.get("last_exit"):
        return f"; last exit: {worker['last_exit']}"
    return ""


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
    totals = reply["totals"]
    kernel = reply.get("kernel")
    if kernel is not None:
        passed = ", ".join(f"{k[5:]}={v}" for k, v in kernel.items() if k.startswith("pass_") and v)
        lines.append(
            f"kernel fast path: {totals['kernel_flows']} flows, forwarded "
            f"{kernel['to_transceiver']} in ({kernel['to_transceiver_bytes']} bytes), "
            f"{kernel['to_client']} out ({kernel['to_client_bytes']} bytes); "
            f"left to workers: {passed or '-'}"
            + (f"; failed {kernel['failed']}" if kernel.get("failed") else "")
        )
    elif reply.get("fast_path", "off") != "off":
        lines.append(f"kernel fast path {reply['fast_path']}")
    if totals.get("tcp_accepted"):
        lines.append(
            f"tcp: {totals['tcp_connections']} connections open, {totals['tcp_flows']} with a "
            f"flow; {totals['tcp_accepted']} accepted"
        )
    refused = (reply.get("restore") or {}).get("refused")
    if refused:
        lines.append(f"restore: refused at start, started empty: {refused}")
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
    from voicerelay.relay import spawn
    from voicerelay.relay.preflight import ensure_secret

    config = build_config(listen, state_dir, **options)
    usable_state_dir(config.state_dir)  # fail on a bad option before the running relay stops
    ensure_secret(config)
    pid = spawn.restart(config)
    click.echo(
        f"relay restarted on {config.listen_host}:{config.listen_port} "
        f"with {config.workers} workers (pid {pid}); log: {config.log_file}"
        + fast_path_note(config)
    )


commands: list[click.Command] = [start, stop, restart, stats, status]
