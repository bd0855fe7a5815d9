"""`relayctl agent`: run the offline reference agent (Whisper tiny.en + espeak-ng)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import Any

import click

from voicerelay.cli.options import parse_hostport
from voicerelay.config import DEFAULT_AGENT_PORT, DEFAULT_HOST, ConfigError

log = logging.getLogger("voicerelay.agent")


@dataclass(frozen=True)
class AgentConfig:
    listen: tuple[str, int]
    key: str | None
    voice: str
    words_per_minute: int
    asr_threads: int
    pace: float | None


def agent_config(
    listen: str,
    key: str | None,
    voice: str,
    words_per_minute: int,
    asr_threads: int,
    pace: float | None,
) -> AgentConfig:
    """Checked options (ConfigError, one line, naming the option and the fix)."""
    if not 80 <= words_per_minute <= 450:
        raise ConfigError(f"--words-per-minute {words_per_minute} is out of range: use 80-450")
    if not 1 <= asr_threads <= 64:
        raise ConfigError(f"--asr-threads {asr_threads} is out of range: use 1-64")
    if pace is not None and not 0.1 <= pace <= 100:
        raise ConfigError(f"--pace {pace} is out of range: use 0.1-100 (times real time)")
    if not voice.strip() or voice.startswith("-"):
        raise ConfigError(
            f"--voice {voice!r} is not a voice name: list them with espeak-ng --voices"
        )
    return AgentConfig(
        listen=parse_hostport(listen, "--listen", example_port=DEFAULT_AGENT_PORT, min_port=0),
        key=key or None,
        voice=voice,
        words_per_minute=words_per_minute,
        asr_threads=asr_threads,
        pace=pace,
    )


def agent_options(func: Any) -> Any:
    options = [
        click.option(
            "--listen",
            envvar="VOICERELAY_AGENT_LISTEN",
            default=f"{DEFAULT_HOST}:{DEFAULT_AGENT_PORT}",
            show_default=True,
            help="HOST:PORT to serve ws://HOST:PORT/v1/realtime on (port 0: any free port).",
        ),
        click.option(
            "--key",
            envvar="VOICERELAY_AGENT_KEY",
            default=None,
            help="Require `Authorization: Bearer KEY` (else 401 before the upgrade).",
        ),
        click.option(
            "--voice",
            envvar="VOICERELAY_AGENT_VOICE",
            default="en-us",
            show_default=True,
            help="espeak-ng voice (espeak-ng --voices lists them).",
        ),
        click.option(
            "--words-per-minute",
            envvar="VOICERELAY_AGENT_WORDS_PER_MINUTE",
            type=int,
            default=160,
            show_default=True,
            help="Speaking rate.",
        ),
        click.option(
            "--asr-threads",
            envvar="VOICERELAY_AGENT_ASR_THREADS",
            type=int,
            default=1,
            show_default=True,
            help="CPU threads for speech recognition (one recognition at a time).",
        ),
        click.option(
            "--pace",
            envvar="VOICERELAY_AGENT_PACE",
            type=float,
            default=None,
            help="Send reply audio at most this many times real time [default: as fast as ready].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_engines(config: AgentConfig) -> tuple[Any, Any]:
    """The Transcriber and Speaker, checked; one-line errors if a dependency is missing."""
    from voicerelay.agent.asr import AsrUnavailable, Transcriber
    from voicerelay.agent.tts import Speaker, TtsError, TtsUnavailable

    try:
        speaker = Speaker(config.voice, config.words_per_minute)
    except TtsUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        speaker.synthesize_sync("ready")
    except TtsError as exc:
        raise ConfigError(f"--voice {config.voice!r} does not work: {exc}") from None
    try:
        transcriber = Transcriber(threads=config.asr_threads)
    except AsrUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    return transcriber, speaker


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


@click.command()
@agent_options
def agent(**options: Any) -> None:
    """Run the offline reference agent: the Realtime subset on a WebSocket (docs/REALTIME.md)."""
    import uvloop

    from voicerelay.agent.server import create_app, start_agent, ws_url
    from voicerelay.process import configure_logging

    config = agent_config(**options)
    configure_logging()
    transcriber, speaker = load_engines(config)
    if config.key is None and not _is_loopback(config.listen[0]):
        log.warning(
            "listening on %s without --key: anyone who reaches it can use it", config.listen
        )

    async def main() -> None:
        app = create_app(transcriber, speaker, key=config.key, pace=config.pace)
        try:
            runner, bound = await start_agent(app, *config.listen)
        except OSError as exc:
            raise ConfigError(
                f"--listen {config.listen[0]}:{config.listen[1]} cannot be bound "
                f"({exc.strerror}): choose another port"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        click.echo(f"reference agent ready: {ws_url(bound)}", err=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    uvloop.run(main())


commands: list[click.Command] = [agent]
