"""`relayctl transceiver`: run one transceiver."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from voicerelay.cli.options import (
    cluster_id_option,
    consent_timeout_option,
    options,
    parse_hostport,
    secret_file_option,
    state_dir_option,
)
from voicerelay.config import (
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_TRANSCEIVER_PORT,
    ConfigError,
    default_state_dir,
)
from voicerelay.transceiver.config import TransceiverConfig


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
) -> TransceiverConfig:
    """A validated TransceiverConfig from CLI values (ConfigError names the fix)."""
    return TransceiverConfig(
        internal=parse_hostport(
            internal, "--internal", example_port=DEFAULT_TRANSCEIVER_PORT, min_port=0
        ),
        http=parse_hostport(http, "--http", example_port=DEFAULT_HTTP_PORT, min_port=0),
        relay_public=parse_hostport(relay_public, "--relay-public", DEFAULT_PUBLIC_PORT),
        state_dir=state_dir or default_state_dir(),
        secret_file=secret_file,
        cluster_id=cluster_id,
        consent_timeout=consent_timeout,
        max_sessions=max_sessions,
        agent_url=agent_url or None,
        agent_key=agent_key or None,
    )


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
        help="The relay's public HOST:PORT, the only candidate in answers.",
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
)


@click.command()
@transceiver_options
def transceiver(**options: Any) -> None:
    """Run a transceiver: every session on one UDP endpoint, WHIP signaling over HTTP."""
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
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        click.echo(
            f"transceiver ready: signaling http://{node.http_addr[0]}:{node.http_addr[1]}/",
            err=True,
        )
        try:
            await stop.wait()
        finally:
            await node.stop()

    uvloop.run(main())


commands: list[click.Command] = [transceiver]
