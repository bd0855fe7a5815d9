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

from voicerelay.cli.options import (
    consent_timeout_option,
    signaling_auth_options,
    state_dir_option,
    workers_option,
)
from voicerelay.config import (
    DEFAULT_AGENT_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_INTERNAL_PORT_BASE,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_TRANSCEIVER_PORT,
    ConfigError,
    default_state_dir,
)
from voicerelay.relay.config import RelayConfig

AGENT_HOST = "127.0.0.1"  # the reference agent listens on loopback only, whatever --host says


def _start_agent_child(host: str, port: int, log_file: Path, timeout: float = 90.0):
    """The reference agent as a child of this process, once its /healthz answers."""
    from voicerelay.process import die_with_parent

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
    default=DEFAULT_AGENT_PORT,
    show_default=True,
    help="The reference agent's WebSocket port (loopback).",
)
@click.option(
    "--host",
    envvar="VOICERELAY_HOST",
    default=DEFAULT_HOST,
    show_default=True,
    help="Address everything binds to (clients must reach it).",
)
@click.option(
    "--public-port",
    envvar="VOICERELAY_PUBLIC_PORT",
    type=int,
    default=DEFAULT_PUBLIC_PORT,
    show_default=True,
    help="The relay's public UDP port.",
)
@click.option(
    "--internal-port-base",
    envvar="VOICERELAY_INTERNAL_PORT_BASE",
    type=int,
    default=DEFAULT_INTERNAL_PORT_BASE,
    show_default=True,
    help="First of the relay workers' internal UDP ports.",
)
@click.option(
    "--transceiver-port",
    envvar="VOICERELAY_TRANSCEIVER_PORT",
    type=int,
    default=DEFAULT_TRANSCEIVER_PORT,
    show_default=True,
    help="The transceiver's internal UDP port.",
)
@click.option(
    "--http-port",
    envvar="VOICERELAY_HTTP_PORT",
    type=int,
    default=DEFAULT_HTTP_PORT,
    show_default=True,
    help="Signaling and demo page (HTTP).",
)
@workers_option("Relay workers")
@state_dir_option("Secret and snapshot")
@consent_timeout_option(from_env=False)
@signaling_auth_options()
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
    api_key: str | None,
    require_auth: bool,
    cors_origins: tuple[str, ...],
) -> None:
    """Start the local voice stack and print where to talk to it. Ctrl-C stops everything."""
    import uvloop

    from voicerelay.cli.options import check_port, usable_state_dir
    from voicerelay.net import check_port_free
    from voicerelay.relay import control, spawn
    from voicerelay.relay.preflight import ensure_secret, refuse_if_running
    from voicerelay.transceiver.config import DEFAULT_RELAYS, TransceiverConfig
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
        relays=(*DEFAULT_RELAYS, host),  # the relay's workers send from --host (or loopback)
        agent_url=agent_url,
        agent_key=agent_key,
        api_key=api_key or None,
        require_auth=require_auth,
        cors_origins=cors_origins,
    )
    run_reference_agent = app == "agent" and agent_url is None
    refuse_if_running(
        relay_config,
        f"stop it with `relayctl stop --listen {host}:{public_port}` or choose --public-port",
    )
    check_port_free(host, public_port, "public port", "--public-port")
    for i in range(relay_config.workers):
        check_port_free(host, internal_port_base + i, "internal port", "--internal-port-base")
    check_port_free(host, transceiver_port, "transceiver port", "--transceiver-port")
    check_port_free(host, http_port, "port", "--http-port", tcp=True)
    if run_reference_agent:
        check_port_free(AGENT_HOST, agent_port, "port", "--agent-port", tcp=True)
    usable_state_dir(relay_config.state_dir)
    ensure_secret(relay_config)

    agent = None
    if run_reference_agent:
        agent, tx_config.agent_url = _start_agent_child(
            AGENT_HOST, agent_port, relay_config.state_dir / "agent.log"
        )
    try:
        relay = spawn.start_child(relay_config)
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
        click.echo(f"  {node.api_key.describe()}")
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


commands: list[click.Command] = [up]
