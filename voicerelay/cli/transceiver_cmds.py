"""`relayctl transceiver` (run one) and `relayctl call URL` (test a stack with a real client)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import click

from voicerelay.cli.relay_cmds import parse_hostport
from voicerelay.relay.config import DEFAULT_PUBLIC_PORT, ConfigError, default_state_dir
from voicerelay.transceiver.config import TransceiverConfig

DEFAULT_TRANSCEIVER_PORT = 5000
DEFAULT_HTTP_PORT = 8080


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


def transceiver_options(func):
    options = [
        click.option(
            "--internal",
            envvar="VOICERELAY_TRANSCEIVER_INTERNAL",
            default=f"127.0.0.1:{DEFAULT_TRANSCEIVER_PORT}",
            show_default=True,
            help="UDP HOST:PORT the relay sends envelopes to.",
        ),
        click.option(
            "--http",
            envvar="VOICERELAY_HTTP",
            default=f"127.0.0.1:{DEFAULT_HTTP_PORT}",
            show_default=True,
            help="Signaling and demo page HOST:PORT.",
        ),
        click.option(
            "--relay-public",
            envvar="VOICERELAY_RELAY_PUBLIC",
            default=f"127.0.0.1:{DEFAULT_PUBLIC_PORT}",
            show_default=True,
            help="The relay's public HOST:PORT, the only candidate in answers.",
        ),
        click.option(
            "--state-dir",
            envvar="VOICERELAY_STATE_DIR",
            type=click.Path(path_type=Path),
            default=None,
            help="Where secret.key lives [default: ~/.local/state/voicerelay].",
        ),
        click.option(
            "--secret-file",
            envvar="VOICERELAY_SECRET_FILE",
            type=click.Path(path_type=Path),
            default=None,
            help="Routing-token keys shared with the relay.",
        ),
        click.option(
            "--cluster-id", envvar="VOICERELAY_CLUSTER_ID", type=int, default=0, show_default=True
        ),
        click.option(
            "--consent-timeout",
            envvar="VOICERELAY_CONSENT_TIMEOUT",
            type=float,
            default=30.0,
            show_default=True,
            help="Seconds without a consent check before a call ends (RFC 7675: 30; "
            "browsers check every ~5 s, so stay well above that).",
        ),
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@transceiver_options
def transceiver(**options: Any) -> None:
    """Run a transceiver: every session on one UDP endpoint, WHIP signaling over HTTP."""
    import uvloop

    from voicerelay.transceiver.signaling import Transceiver
    from voicerelay.wire.token import TokenError

    config = transceiver_config(**options)
    if not config.secret_path.exists():
        raise ConfigError(
            f"secret file {config.secret_path} does not exist: point --secret-file at the "
            "relay's secret (`relayctl start` creates <state-dir>/secret.key)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

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


@click.command()
@click.argument("url", default="http://127.0.0.1:8080")
@click.option("--tone", type=float, default=440.0, show_default=True, help="Tone frequency (Hz).")
@click.option(
    "--play",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Play this WAV (16-bit PCM, mono or stereo, any rate) as the microphone instead of "
    "the tone, then listen for the replies and report the turn timings.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --play: write what came back here (48 kHz mono WAV on the call's timeline).",
)
@click.option(
    "--seconds",
    type=float,
    default=None,
    help="Tone: how long to talk [default: 2]. --play: the most to listen after the file "
    "[default: 15].",
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for audio."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def call(
    url: str,
    tone: float,
    play: Path | None,
    record: Path | None,
    seconds: float | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Place one call with a real WebRTC client: check the tone comes back, or play a WAV and
    time the replies."""
    import dataclasses
    import json

    from voicerelay.cli.call_client import WavError, load_wav, place_call, place_voice_call

    if not 20 <= tone <= 20000:
        raise click.BadParameter("use 20-20000 Hz", param_hint="--tone")
    if seconds is not None and not 0.2 <= seconds <= 3600:
        raise click.BadParameter("use 0.2-3600 s", param_hint="--seconds")
    if not 0.1 <= timeout <= 3600:
        raise click.BadParameter("use 0.1-3600 s", param_hint="--timeout")
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{url!r} is not a signaling URL: write e.g. http://127.0.0.1:8080", param_hint="URL"
        )
    if record is not None and play is None:
        raise click.BadParameter(
            "records what comes back from --play: add --play", param_hint="--record"
        )
    if record is not None and not record.parent.is_dir():
        raise click.BadParameter(f"directory {record.parent} does not exist", param_hint="--record")
    if play is None:
        report = asyncio.run(place_call(url, tone, 2.0 if seconds is None else seconds, timeout))
        if as_json:
            click.echo(
                json.dumps({**dataclasses.asdict(report), "tone_came_back": report.tone_came_back})
            )
        elif report.error:
            click.echo(f"call failed: {report.error}")
        else:
            click.echo(describe_call(report))
        if not report.tone_came_back:
            raise SystemExit(1)
        return
    try:
        audio = load_wav(play)
    except WavError as exc:
        raise click.BadParameter(f"{play}: {exc}", param_hint="--play") from None
    voice = asyncio.run(
        place_voice_call(
            url, audio, record, listen_s=15.0 if seconds is None else seconds, timeout=timeout
        )
    )
    click.echo(json.dumps(voice.to_json()) if as_json else describe_call(voice))
    if not voice.audio_came_back:
        raise SystemExit(1)


def describe_call(report: Any) -> str:
    """The human verdict of `relayctl call`: did the tone come back, how fast, how clean; for
    `--play`, the turns (see `call_client.describe_voice_call`)."""
    from voicerelay.cli.call_client import VoiceCallReport, describe_voice_call

    if isinstance(report, VoiceCallReport):
        return describe_voice_call(report)
    verdict = "came back" if report.tone_came_back else "did NOT come back"
    lines = [
        f"tone {report.tone_hz:.0f} Hz {verdict} (heard {report.received_hz:.0f} Hz, "
        f"{(report.purity or 0) * 100:.0f}% of the echo); "
        f"setup {report.setup_ms:.0f} ms (offer posted -> first echoed audio)"
    ]
    detail = f"  {report.audio_seconds:.1f} s of audio back"
    if report.max_frame_gap_ms is not None:
        detail += f", longest gap {report.max_frame_gap_ms:.0f} ms"
    remote = report.stats.get("client", {}).get("remote_inbound") or {}
    server = report.stats.get("server") or {}
    if remote:  # the transceiver's RTCP report on what it received from us
        detail += f"; server reports {remote.get('packets_lost')} of ours lost"
    rtt = remote.get("round_trip_time") or server.get("rtt")
    if rtt is not None:
        detail += f", RTT {rtt * 1000:.1f} ms"
    lines.append(detail)
    return "\n".join(lines)


commands: list[click.Command] = [transceiver, call]
