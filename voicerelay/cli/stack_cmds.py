"""`relayctl up`: the whole local stack (relay workers, one transceiver, signaling, demo page,
the offline reference agent) on embedded defaults, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from voicerelay.relay.config import ConfigError, RelayConfig, default_state_dir


def _start_relay_child(config: RelayConfig, timeout: float = 15.0) -> subprocess.Popen:
    """The launcher as a child of this process (it dies with us), once it answers."""
    from voicerelay.relay import control, launcher
    from voicerelay.relay.worker import die_with_parent

    with open(config.log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "voicerelay.relay.launcher", launcher.config_to_json(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    deadline = time.monotonic() + timeout
    while not control.is_running(config):
        if child.poll() is not None:
            raise ConfigError(launcher._failure_line(config.log_file, child.returncode))
        if time.monotonic() > deadline:
            child.kill()
            raise ConfigError(
                f"relay did not come up within {timeout:.0f} s: see {config.log_file}"
            )
        time.sleep(0.02)
    return child


def _start_agent_child(host: str, port: int, log_file: Path, timeout: float = 90.0):
    """The reference agent as a child of this process, once its /healthz answers."""
    from voicerelay.relay.worker import die_with_parent

    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "voicerelay.agent", "--listen", f"{host}:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    url_host = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + timeout
    while True:
        if child.poll() is not None:
            last = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"the reference agent did not start: {last[0]} (log {log_file})")
        try:
            with urllib.request.urlopen(f"http://{url_host}:{port}/healthz", timeout=0.5) as r:
                if r.status == 200:
                    return child, f"ws://{url_host}:{port}/v1/realtime"
        except OSError:
            pass
        if time.monotonic() > deadline:
            child.kill()
            raise ConfigError(
                f"the reference agent did not answer within {timeout:.0f} s: see {log_file}"
            )
        time.sleep(0.05)


def _stop_child(child: subprocess.Popen | None) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()


@click.command()
@click.option(
    "--app",
    envvar="VOICERELAY_APP",
    type=click.Choice(["agent", "echo"]),
    default="agent",
    show_default=True,
    help="agent: calls talk to a voice agent (the offline reference agent unless --agent-url); "
    "echo: calls hear themselves.",
)
@click.option(
    "--agent-url",
    envvar="VOICERELAY_AGENT_URL",
    default=None,
    help="A Realtime-compatible backend (ws://…/v1/realtime) instead of the reference agent.",
)
@click.option(
    "--agent-key", envvar="VOICERELAY_AGENT_KEY", default=None, help="The backend's API key."
)
@click.option(
    "--agent-port",
    envvar="VOICERELAY_AGENT_PORT",
    type=int,
    default=8765,
    show_default=True,
    help="The reference agent's WebSocket port (loopback).",
)
@click.option(
    "--host",
    envvar="VOICERELAY_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address everything binds to (clients must reach it).",
)
@click.option(
    "--public-port",
    envvar="VOICERELAY_PUBLIC_PORT",
    type=int,
    default=3478,
    show_default=True,
    help="The relay's public UDP port.",
)
@click.option(
    "--internal-port-base",
    envvar="VOICERELAY_INTERNAL_PORT_BASE",
    type=int,
    default=4000,
    show_default=True,
    help="First of the relay workers' internal UDP ports.",
)
@click.option(
    "--transceiver-port",
    envvar="VOICERELAY_TRANSCEIVER_PORT",
    type=int,
    default=5000,
    show_default=True,
    help="The transceiver's internal UDP port.",
)
@click.option(
    "--http-port",
    envvar="VOICERELAY_HTTP_PORT",
    type=int,
    default=8080,
    show_default=True,
    help="Signaling and demo page (HTTP).",
)
@click.option(
    "--workers",
    envvar="VOICERELAY_WORKERS",
    type=int,
    default=None,
    help="Relay workers [default: one per core].",
)
@click.option(
    "--state-dir",
    envvar="VOICERELAY_STATE_DIR",
    type=click.Path(path_type=Path),
    default=None,
    help="Secret and snapshot [default: ~/.local/state/voicerelay].",
)
@click.option(
    "--consent-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds without a consent check before a call ends (RFC 7675: 30; "
    "browsers check every ~5 s, so stay well above that).",
)
def up(
    app: str,
    agent_url: str | None,
    agent_key: str | None,
    agent_port: int,
    host: str,
    public_port: int,
    internal_port_base: int,
    transceiver_port: int,
    http_port: int,
    workers: int | None,
    state_dir: Path | None,
    consent_timeout: float,
) -> None:
    """Start the local voice stack and print where to talk to it. Ctrl-C stops everything."""
    import uvloop

    from voicerelay.cli.relay_cmds import check_port, usable_state_dir
    from voicerelay.relay import control
    from voicerelay.relay.launcher import check_port_free, ensure_secret
    from voicerelay.transceiver.config import TransceiverConfig
    from voicerelay.transceiver.signaling import Transceiver

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"--host {host!r} is not an IP address: give a literal such as 127.0.0.1 or ::1"
        ) from None
    for port, option in (
        (public_port, "--public-port"),
        (internal_port_base, "--internal-port-base"),
        (transceiver_port, "--transceiver-port"),
        (http_port, "--http-port"),
        (agent_port, "--agent-port"),
    ):
        check_port(port, option)
    if agent_url is not None and app == "echo":
        raise ConfigError("--agent-url needs --app agent (echo calls talk to no backend)")
    state = state_dir or default_state_dir()
    relay_config = RelayConfig(
        listen_host=host,
        listen_port=public_port,
        internal_host=host,
        internal_port_base=internal_port_base,
        state_dir=state,
        **({"workers": workers} if workers is not None else {}),
    )
    tx_config = TransceiverConfig(
        internal=(host, transceiver_port),
        http=(host, http_port),
        relay_public=(host, public_port),
        state_dir=state,
        consent_timeout=consent_timeout,
        agent_url=agent_url,
        agent_key=agent_key,
    )
    run_reference_agent = app == "agent" and agent_url is None
    if control.is_running(relay_config):
        raise ConfigError(
            f"a relay already runs on port {public_port}: stop it with `relayctl stop "
            f"--listen {host}:{public_port}` or choose --public-port"
        )
    check_port_free(host, public_port, "public port", "--public-port")
    for i in range(relay_config.workers):
        check_port_free(host, internal_port_base + i, "internal port", "--internal-port-base")
    check_port_free(host, transceiver_port, "transceiver port", "--transceiver-port")
    _check_tcp_free(host, http_port)
    if run_reference_agent:
        _check_tcp_free("127.0.0.1", agent_port, "--agent-port")
    usable_state_dir(relay_config.state_dir)
    ensure_secret(relay_config)

    agent = None
    if run_reference_agent:
        agent, tx_config.agent_url = _start_agent_child(
            "127.0.0.1", agent_port, relay_config.state_dir / "agent.log"
        )
    try:
        relay = _start_relay_child(relay_config)
    except BaseException:
        _stop_child(agent)
        raise

    async def serve() -> None:
        node = Transceiver(tx_config)
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url_host = f"[{host}]" if ":" in host else host
        click.echo(f"voicerelay is up: open http://{url_host}:{node.http_addr[1]}/ and press Talk")
        if app == "echo":
            click.echo("  app: echo (calls hear themselves)")
        elif run_reference_agent:
            click.echo(
                f"  app: the offline reference agent ({tx_config.agent_url}): "
                "say something, it says back what it heard"
            )
        else:
            click.echo(f"  app: voice agent at {tx_config.agent_url}")
        click.echo(
            f"  relay {host}:{public_port} ({relay_config.workers} workers), "
            f"transceiver {host}:{transceiver_port}, state {relay_config.state_dir}"
        )
        click.echo(
            f"  try `relayctl call http://{url_host}:{node.http_addr[1]}`; "
            "`relayctl stats` shows the relay; Ctrl-C stops everything"
        )
        try:
            await stop.wait()
        finally:
            await node.stop()

    try:
        uvloop.run(serve())
    finally:
        try:
            control.stop(relay_config, timeout=10)
        except control.ControlError:
            relay.terminate()
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()
        _stop_child(agent)
        click.echo("voicerelay stopped")


def _check_tcp_free(host: str, port: int, option: str = "--http-port") -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"port {host}:{port} is in use ({exc.strerror}): choose another with {option}"
            ) from None


commands: list[click.Command] = [up]
