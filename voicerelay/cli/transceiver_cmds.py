"""`relayctl transceiver`: run one transceiver."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from voicerelay.cli.options import (
    cluster_id_option,
    consent_timeout_option,
    options,
    parse_hostport,
    secret_file_option,
    signaling_auth_options,
    state_dir_option,
    tls_files,
    tls_options,
)
from voicerelay.config import (
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_TRANSCEIVER_PORT,
    ConfigError,
    default_state_dir,
)
from voicerelay.transceiver.config import DEFAULT_RELAYS, TransceiverConfig

if TYPE_CHECKING:
    from aiohttp import web

    from voicerelay.transceiver.signaling import Transceiver

log = logging.getLogger("voicerelay.transceiver")


def transceiver_config(
    internal: str,
    http: str,
    relay_public: str,
    state_dir: Path | None,
    secret_file: Path | None,
    cluster_id: int,
    consent_timeout: float,
    max_sessions: int,
    agent_url: str | None = None,
    agent_key: str | None = None,
    connect_timeout: float = 10.0,
    relays: str = ",".join(DEFAULT_RELAYS),
    api_key: str | None = None,
    require_auth: bool = False,
    cors_origins: tuple[str, ...] = (),
    session_rate: float = 2.0,
    session_burst: int = 20,
    https: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
    tcp_port: int = 0,
    ingress: tuple[str, ...] = (),
) -> TransceiverConfig:
    """A validated TransceiverConfig from CLI values (ConfigError names the fix)."""
    http_addr = parse_hostport(http, "--http", example_port=DEFAULT_HTTP_PORT, min_port=0)
    cert, key, _ = tls_files(https, cert, key, state_dir or default_state_dir(), [http_addr[0]])
    return TransceiverConfig(
        internal=parse_hostport(
            internal, "--internal", example_port=DEFAULT_TRANSCEIVER_PORT, min_port=0
        ),
        http=http_addr,
        relay_public=parse_relay_public(relay_public),
        state_dir=state_dir or default_state_dir(),
        secret_file=secret_file,
        cluster_id=cluster_id,
        consent_timeout=consent_timeout,
        max_sessions=max_sessions,
        connect_timeout=connect_timeout,
        relays=tuple(relays.split(",")),
        agent_url=agent_url or None,
        agent_key=agent_key or None,
        api_key=api_key or None,
        require_auth=require_auth,
        cors_origins=cors_origins,
        session_rate=session_rate,
        session_burst=session_burst,
        tls_cert=cert,
        tls_key=key,
        relay_tcp_port=tcp_port,
        ingresses=tuple(parse_ingress(entry) for entry in ingress),
    )


def parse_ingress(entry: str) -> tuple[str, tuple[str, int]]:
    """`--ingress NAME=HOST:PORT`: an edge relay ingress signaling may advertise."""
    name, sep, hostport = entry.partition("=")
    if not sep or not name.strip():
        raise ConfigError(
            f"--ingress {entry!r} is not NAME=HOST:PORT: write e.g. eu=192.0.2.7:3478"
        )
    return name.strip(), parse_hostport(hostport, "--ingress", DEFAULT_PUBLIC_PORT)


def parse_relay_public(text: str) -> tuple[tuple[str, int], ...]:
    """`--relay-public HOST:PORT[,HOST:PORT...]`: every address answers list, in order."""
    entries = [e for e in text.split(",") if e.strip()]
    if not entries:
        raise ConfigError(
            f"--relay-public is empty: write e.g. {DEFAULT_HOST}:{DEFAULT_PUBLIC_PORT}"
        )
    return tuple(parse_hostport(e, "--relay-public", DEFAULT_PUBLIC_PORT) for e in entries)


transceiver_options = options(
    click.option(
        "--internal",
        envvar="VOICERELAY_TRANSCEIVER_INTERNAL",
        default=f"{DEFAULT_HOST}:{DEFAULT_TRANSCEIVER_PORT}",
        show_default=True,
        help="UDP HOST:PORT the relay sends envelopes to.",
    ),
    click.option(
        "--http",
        envvar="VOICERELAY_HTTP",
        default=f"{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}",
        show_default=True,
        help="Signaling and demo page HOST:PORT.",
    ),
    click.option(
        "--relay-public",
        envvar="VOICERELAY_RELAY_PUBLIC",
        default=f"{DEFAULT_HOST}:{DEFAULT_PUBLIC_PORT}",
        show_default=True,
        help="The relay's public HOST:PORT, or several comma-separated (IPv4 and IPv6): "
        "the candidates answers list, in order. Addresses clients reach, never a wildcard.",
    ),
    click.option(
        "--ingress",
        envvar="VOICERELAY_INGRESS",
        multiple=True,
        help="NAME=HOST:PORT of an edge relay ingress (repeatable; the variable takes several "
        "separated by spaces): an offer whose X-Voicerelay-Ingress header names it gets that "
        "address as its candidate (the global hop).",
    ),
    click.option(
        "--tcp-port",
        envvar="VOICERELAY_TCP_PORT",
        type=int,
        default=0,
        show_default=True,
        help="The relay's ICE-TCP port (relayctl start --tcp-port): answers also list a passive "
        "TCP candidate there on each --relay-public host, after the UDP ones; 0: none.",
    ),
    state_dir_option("Where secret.key lives"),
    secret_file_option("shared with the relay"),
    cluster_id_option(),
    consent_timeout_option(from_env=True),
    click.option(
        "--max-sessions",
        envvar="VOICERELAY_MAX_SESSIONS",
        type=int,
        default=2000,
        show_default=True,
    ),
    click.option(
        "--connect-timeout",
        envvar="VOICERELAY_CONNECT_TIMEOUT",
        type=float,
        default=10.0,
        show_default=True,
        help="Seconds a new session has to connect (ICE and DTLS) before it is closed "
        "(never-connected) and its place freed.",
    ),
    click.option(
        "--relays",
        envvar="VOICERELAY_RELAYS",
        default=",".join(DEFAULT_RELAYS),
        show_default=True,
        help="Who may send envelopes to --internal: the relays' addresses or networks (CIDR), "
        "comma-separated; anything else is dropped and counted.",
    ),
    click.option(
        "--agent-url",
        envvar="VOICERELAY_AGENT_URL",
        default=None,
        help="Realtime-compatible backend (ws://HOST:PORT/v1/realtime) for every call; "
        "without it calls are echoed.",
    ),
    click.option(
        "--agent-key",
        envvar="VOICERELAY_AGENT_KEY",
        default=None,
        help="The backend's API key (sent as Authorization: Bearer).",
    ),
    signaling_auth_options(),
    tls_options(),
    click.option(
        "--session-rate",
        envvar="VOICERELAY_SESSION_RATE",
        type=float,
        default=2.0,
        show_default=True,
        help="New sessions a second per client address (IPv6: per /64) without the API key; "
        "0 turns the limit off.",
    ),
    click.option(
        "--session-burst",
        envvar="VOICERELAY_SESSION_BURST",
        type=int,
        default=20,
        show_default=True,
        help="How many of those a client may place at once.",
    ),
    click.option(
        "--drain-grace",
        envvar="VOICERELAY_DRAIN_GRACE",
        type=click.FloatRange(0, 86400),
        default=300.0,
        show_default=True,
        help="After SIGTERM, seconds calls in progress may go on (new ones are refused) "
        "before the process exits.",
    ),
    click.option(
        "--metrics",
        envvar="VOICERELAY_METRICS",
        default=None,
        help="Also serve /metrics, /healthz and /readyz on HOST:PORT (they are always on the "
        "signaling port too) [default: off].",
    ),
)


async def serve_until_signalled(node: Transceiver, drain_grace: float) -> str:
    """Serve until SIGINT (stop now) or SIGTERM (drain); returns how it ended: "stopped",
    "drained" (the last call ended) or "grace expired". A second SIGTERM stops at once."""
    loop = asyncio.get_running_loop()
    stop_now, drain = asyncio.Event(), asyncio.Event()

    def on_sigterm() -> None:
        (stop_now if drain.is_set() else drain).set()

    loop.add_signal_handler(signal.SIGINT, stop_now.set)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    if await _first(stop_now, drain) is stop_now:
        return "stopped"
    drained = node.server.drain()
    log.info(
        "draining: new sessions refused, %d in progress may go on for %g s",
        len(node.server.calls),
        drain_grace,
    )
    ended = await _first(stop_now, drained, timeout=drain_grace)
    if ended is drained:
        return "drained"
    return "stopped" if ended is stop_now else "grace expired"


async def _first(*events: asyncio.Event, timeout: float | None = None) -> asyncio.Event | None:
    """The first of `events` to be set (None: `timeout` passed first)."""
    waits = {asyncio.ensure_future(e.wait()): e for e in events}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return next((waits[t] for t in done), None)


async def serve_metrics(node: Transceiver, hostport: str | None) -> web.AppRunner | None:
    """`--metrics HOST:PORT`: the probes and metrics on a port of their own (None: off)."""
    if not hostport:
        return None
    from voicerelay import metrics

    host, port = parse_hostport(hostport, "--metrics", example_port=9101, min_port=0)
    app = metrics.health_app(node.server.registry, node.server.not_ready)
    try:
        return await metrics.serve_health(app, host, port)
    except OSError as exc:
        raise ConfigError(f"cannot serve --metrics on {hostport} ({exc.strerror})") from None


@click.command()
@transceiver_options
def transceiver(drain_grace: float, metrics: str | None, **options: Any) -> None:
    """Run a transceiver: every session on one UDP endpoint, WHIP signaling over HTTP.

    SIGTERM drains it (docs/OPERATIONS.md): new sessions get 503, calls in progress go on
    until they end or --drain-grace passes, then it exits 0. SIGINT stops it at once."""
    import uvloop

    from voicerelay.process import configure_logging
    from voicerelay.transceiver.signaling import Transceiver
    from voicerelay.wire.token import TokenError

    config = transceiver_config(**options)
    if not config.secret_path.exists():
        raise ConfigError(
            f"secret file {config.secret_path} does not exist: point --secret-file at the "
            "relay's secret (`relayctl start` creates <state-dir>/secret.key)"
        )
    configure_logging()

    async def main() -> None:
        try:
            node = Transceiver(config)
        except TokenError as exc:
            raise ConfigError(str(exc).removeprefix("secret: ")) from None
        try:
            await node.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot bind: {exc.strerror}: choose other ports with --internal / --http"
            ) from None
        runner = None
        try:
            runner = await serve_metrics(node, metrics)
            click.echo(
                f"transceiver ready: signaling {node.url}/; {node.api_key.describe()}", err=True
            )
            ended = await serve_until_signalled(node, drain_grace)
            log.info("transceiver stopping: %s", ended)
        finally:
            if runner is not None:
                await runner.cleanup()
            await node.stop()

    uvloop.run(main())


commands: list[click.Command] = [transceiver]
