"""`relayctl call URL`: place one call with a real WebRTC client (`call_client`) and say
what came back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from voicerelay.config import DEFAULT_HOST, DEFAULT_HTTP_PORT

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}"


@click.command()
@click.argument("url", default=DEFAULT_URL)
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
@click.option(
    "--token",
    envvar="VOICERELAY_TOKEN",
    default=None,
    help="A client token (`relayctl token`) or the API key, when signaling requires one.",
)
@click.option(
    "--local-address",
    envvar="VOICERELAY_LOCAL_ADDRESS",
    default=None,
    help="Send from this local address only [default: the address this host routes from "
    "towards each candidate of the answer].",
)
@click.option(
    "--cafile",
    envvar="VOICERELAY_CAFILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Trust this certificate (PEM) for an https URL, e.g. the one `relayctl up --https` "
    "made (<state-dir>/https.crt).",
)
@click.option(
    "--tcp",
    is_flag=True,
    help="ICE over TCP only, to the answer's passive TCP candidate (the stack needs "
    "`relayctl up --tcp-port N`), as from a network that blocks UDP: the tone call, on the "
    "project's own WebRTC client (aiortc does not speak ICE-TCP).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def call(
    url: str,
    tone: float,
    play: Path | None,
    record: Path | None,
    seconds: float | None,
    timeout: float,
    token: str | None,
    local_address: str | None,
    cafile: Path | None,
    tcp: bool,
    as_json: bool,
) -> None:
    """Place one call with a real WebRTC client: check the tone comes back, or play a WAV and
    time the replies. A failure names its step (signaling, ICE, DTLS, media) and the fix."""
    import dataclasses
    import json

    from voicerelay.cli.call_client import (
        WavError,
        load_wav,
        place_call,
        place_tcp_call,
        place_voice_call,
    )

    if not 20 <= tone <= 20000:
        raise click.BadParameter("use 20-20000 Hz", param_hint="--tone")
    if seconds is not None and not 0.2 <= seconds <= 3600:
        raise click.BadParameter("use 0.2-3600 s", param_hint="--seconds")
    if not 0.1 <= timeout <= 3600:
        raise click.BadParameter("use 0.1-3600 s", param_hint="--timeout")
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{url!r} is not a signaling URL: write e.g. {DEFAULT_URL}", param_hint="URL"
        )
    if record is not None and play is None:
        raise click.BadParameter(
            "records what comes back from --play: add --play", param_hint="--record"
        )
    if tcp and play is not None:
        raise click.BadParameter("--tcp places the tone call only: drop --play", param_hint="--tcp")
    if record is not None and not record.parent.is_dir():
        raise click.BadParameter(f"directory {record.parent} does not exist", param_hint="--record")
    if local_address is not None:
        local_address = check_local_address(local_address)
    reach = {"token": token, "local_address": local_address, "cafile": cafile}
    if play is None:
        place = place_tcp_call if tcp else place_call
        report = asyncio.run(
            place(url, tone, 2.0 if seconds is None else seconds, timeout, **reach)
        )
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
            url,
            audio,
            record,
            listen_s=15.0 if seconds is None else seconds,
            timeout=timeout,
            **reach,
        )
    )
    click.echo(json.dumps(voice.to_json()) if as_json else describe_call(voice))
    if not voice.audio_came_back:
        raise SystemExit(1)


def check_local_address(text: str) -> str:
    """`--local-address`: an address of a family and kind a socket can send from."""
    from voicerelay.addresses import ip

    address = ip(text)
    if address is None or address.is_unspecified or address.is_multicast or "%" in text:
        raise click.BadParameter(
            f"{text!r} is not a local unicast address: give one of this host's addresses, "
            "e.g. 127.0.0.1 or ::1",
            param_hint="--local-address",
        )
    return str(address)


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


commands: list[click.Command] = [call]
