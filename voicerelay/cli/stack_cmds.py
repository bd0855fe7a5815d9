"""`relayctl up`: the whole local stack (relay workers, one transceiver, signaling, demo page,
the offline reference agent) on embedded defaults, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from voicerelay.addresses import (
    AddressPlan,
    format_addr,
    host_interfaces,
    ipv4_arrives_on_ipv6_sockets,
    is_loopback,
    is_wildcard,
    plan_addresses,
)
from voicerelay.cli.options import (
    consent_timeout_option,
    kernel_fast_path_option,
    parse_hostport,
    signaling_auth_options,
    state_dir_option,
    tls_options,
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

AGENT_HOST = "127.0.0.1"  # the reference agent listens on loopback only, whatever --bind says


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


def advertise_line(plan: AddressPlan, public_port: int) -> str:
    """What answers advertise, for the operator."""
    where = ", ".join(format_addr((host, public_port)) for host in plan.advertise)
    if plan.detected:
        return (
            f"answers advertise {where} (127.0.0.1 and this host's interface addresses, so "
            "browsers that skip loopback, such as Firefox, connect; --advertise chooses)"
        )
    return f"answers advertise {where}"


def describe_plan(plan: AddressPlan, public_port: int, http_port: int, https: bool) -> list[str]:
    """`relayctl up --dry-run`: what would listen where, and what answers would advertise."""
    scheme = "https" if https else "http"
    beyond = [
        what
        for what, host in (("signaling", plan.http), ("relay UDP", plan.relay_bind))
        if not is_loopback(host)
    ]
    return [
        f"signaling and the page: {scheme}://{format_addr((plan.http, http_port))}/",
        f"relay UDP: {format_addr((plan.relay_bind, public_port))}; internal sockets on "
        f"{plan.internal}",
        advertise_line(plan, public_port),
        "listening beyond loopback: " + (", ".join(beyond) or "nothing"),
    ]


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
    "--bind",
    "--host",
    "bind",
    envvar=["VOICERELAY_BIND", "VOICERELAY_HOST"],
    default=None,
    help=f"Address signaling, the transceiver and the relay bind [default: {DEFAULT_HOST}; "
    "with no --bind, --relay-bind or --advertise the relay's UDP binds every address and "
    "answers advertise 127.0.0.1 and this host's interface addresses].",
)
@click.option(
    "--relay-bind",
    envvar="VOICERELAY_RELAY_BIND",
    default=None,
    help="Address the relay's public UDP binds instead of --bind (e.g. :: for every address).",
)
@click.option(
    "--advertise",
    envvar="VOICERELAY_ADVERTISE",
    multiple=True,
    default=(),
    help="The relay addresses answers list as candidates, in order: IPv4 and IPv6, "
    "comma-separated or repeated [default: the relay's bind address; a wildcard needs this].",
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
@click.option(
    "--tcp-port",
    envvar="VOICERELAY_TCP_PORT",
    type=int,
    default=0,
    show_default=True,
    help="Also serve ICE over TCP on this port of the relay's address, for clients whose "
    "network blocks UDP (443 in production); answers list it after the UDP candidates. 0: off.",
)
@kernel_fast_path_option()
@workers_option("Relay workers")
@state_dir_option("Secret and snapshot")
@consent_timeout_option(from_env=False)
@signaling_auth_options()
@tls_options()
@click.option(
    "--drain-grace",
    envvar="VOICERELAY_DRAIN_GRACE",
    type=click.FloatRange(0, 86400),
    default=300.0,
    show_default=True,
    help="After SIGTERM, seconds calls in progress may go on (new ones are refused); Ctrl-C "
    "stops at once.",
)
@click.option(
    "--metrics",
    envvar="VOICERELAY_METRICS",
    default=None,
    help="Serve the relay's Prometheus /metrics, /healthz and /readyz on HOST:PORT "
    "[default: off; the transceiver's are on the signaling port].",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what would be bound and advertised, then exit without starting anything.",
)
def up(
    app: str,
    agent_url: str | None,
    agent_key: str | None,
    agent_port: int,
    bind: str | None,
    relay_bind: str | None,
    advertise: tuple[str, ...],
    public_port: int,
    internal_port_base: int,
    transceiver_port: int,
    http_port: int,
    tcp_port: int,
    kernel_fast_path: bool,
    workers: int | None,
    state_dir: Path | None,
    consent_timeout: float,
    api_key: str | None,
    require_auth: bool,
    cors_origins: tuple[str, ...],
    https: bool,
    cert: Path | None,
    key: Path | None,
    drain_grace: float,
    metrics: str | None,
    dry_run: bool,
) -> None:
    """Start the local voice stack and print where to talk to it. Ctrl-C stops everything."""
    import uvloop

    from voicerelay.cli.options import check_port, tls_files, usable_state_dir
    from voicerelay.cli.transceiver_cmds import serve_until_signalled
    from voicerelay.net import check_port_free
    from voicerelay.relay import control, spawn
    from voicerelay.relay.preflight import ensure_secret, refuse_if_running
    from voicerelay.transceiver.config import DEFAULT_RELAYS, TransceiverConfig
    from voicerelay.transceiver.signaling import Transceiver

    plan = plan_addresses(
        bind=bind,
        relay_bind=relay_bind,
        advertise=advertise or None,
        interfaces=host_interfaces,
        dual_stack=ipv4_arrives_on_ipv6_sockets(),
    )
    for port, option in (
        (public_port, "--public-port"),
        (internal_port_base, "--internal-port-base"),
        (transceiver_port, "--transceiver-port"),
        (http_port, "--http-port"),
        (agent_port, "--agent-port"),
    ):
        check_port(port, option)
    if tcp_port:
        check_port(tcp_port, "--tcp-port")
    if agent_url is not None and app == "echo":
        raise ConfigError("--agent-url needs --app agent (echo calls talk to no backend)")
    state = state_dir or default_state_dir()
    relay_config = RelayConfig(
        listen_host=plan.relay_bind,
        listen_port=public_port,
        internal_host=plan.internal,
        internal_port_base=internal_port_base,
        state_dir=state,
        tcp_port=tcp_port,
        kernel_fast_path=kernel_fast_path,
        **({"workers": workers} if workers is not None else {}),
        **_metrics_options(metrics),
    )
    if dry_run:
        click.echo("\n".join(describe_plan(plan, public_port, http_port, https or bool(cert))))
        return
    usable_state_dir(relay_config.state_dir)
    # The certificate names where signaling is reached: its address, or with a wildcard the
    # advertised ones (the relay's addresses are usually the host's too).
    reached = [plan.http, *plan.advertise] if is_wildcard(plan.http) else [plan.http]
    cert, key, tls_line = tls_files(https, cert, key, relay_config.state_dir, reached)
    tx_config = TransceiverConfig(
        internal=(plan.internal, transceiver_port),
        http=(plan.http, http_port),
        relay_public=tuple((host, public_port) for host in plan.advertise),
        state_dir=state,
        consent_timeout=consent_timeout,
        relays=(*DEFAULT_RELAYS, plan.internal),  # the relay's workers send from there
        agent_url=agent_url,
        agent_key=agent_key,
        api_key=api_key or None,
        require_auth=require_auth,
        cors_origins=cors_origins,
        tls_cert=cert,
        tls_key=key,
        relay_tcp_port=tcp_port,
    )
    run_reference_agent = app == "agent" and agent_url is None
    listen = format_addr((plan.relay_bind, public_port))
    refuse_if_running(
        relay_config,
        f"stop it with `relayctl stop --listen {listen}` or choose --public-port",
    )
    check_port_free(plan.relay_bind, public_port, "public port", "--public-port")
    if tcp_port:
        check_port_free(plan.relay_bind, tcp_port, "TCP port", "--tcp-port", tcp=True)
    for i in range(relay_config.workers):
        check_port_free(
            plan.internal, internal_port_base + i, "internal port", "--internal-port-base"
        )
    check_port_free(plan.internal, transceiver_port, "transceiver port", "--transceiver-port")
    check_port_free(plan.http, http_port, "port", "--http-port", tcp=True)
    if run_reference_agent:
        check_port_free(AGENT_HOST, agent_port, "port", "--agent-port", tcp=True)
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
        click.echo(f"voicerelay is up: open {node.url}/ and press Talk")
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
            f"  relay UDP {listen} ({relay_config.workers} workers), transceiver "
            f"{format_addr((plan.internal, transceiver_port))}, state {relay_config.state_dir}"
        )
        if tcp_port:
            click.echo(
                f"  relay TCP {format_addr((plan.relay_bind, tcp_port))}: ICE over TCP, "
                "listed in answers after the UDP candidates"
            )
        if kernel_fast_path:
            from voicerelay.cli.relay_cmds import fast_path_note

            click.echo(fast_path_note(relay_config).lstrip("\n"))
        click.echo(f"  {advertise_line(plan, public_port)}")
        click.echo(f"  {node.api_key.describe()}")
        if tls_line:
            click.echo(f"  {tls_line}")
        cafile = f" --cafile {cert}" if https and cert else ""
        click.echo(
            f"  try `relayctl call {node.url}{cafile}`; "
            "`relayctl stats` shows the relay; Ctrl-C stops everything"
        )
        try:
            await serve_until_signalled(node, drain_grace)
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


def _metrics_options(metrics: str | None) -> dict[str, str | int]:
    """RelayConfig fields for `--metrics HOST:PORT` (none when not given)."""
    if not metrics:
        return {}
    host, port = parse_hostport(metrics, "--metrics", example_port=9100, min_port=0)
    return {"metrics_host": host, "metrics_port": port}


commands: list[click.Command] = [up]
