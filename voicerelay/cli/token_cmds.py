"""`relayctl token`: mint a client token from signaling, as an app's backend does for its
browser (docs/SIGNALING.md); for a test call or the demo page (`--page`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import click

from voicerelay.cli.options import api_key_option, state_dir_option
from voicerelay.config import DEFAULT_HOST, DEFAULT_HTTP_PORT, default_state_dir

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}"


@click.command()
@click.argument("url", default=DEFAULT_URL)
@api_key_option("The transceiver's API key [default: the one in <state-dir>/api.key].")
@state_dir_option("Where the transceiver keeps api.key (read when --api-key is not given)")
@click.option(
    "--expires-in",
    type=int,
    default=60,
    show_default=True,
    help="Seconds the token may place its call (1-600).",
)
@click.option(
    "--page", is_flag=True, help="Print the demo page's address with the token (#token=...)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
def token(
    url: str,
    api_key: str | None,
    state_dir: Path | None,
    expires_in: int,
    page: bool,
    as_json: bool,
) -> None:
    """Mint a client token (POST /v1/client_tokens with the API key). It places one call and
    stays that call's key; print its value, or the demo page's address carrying it."""
    from voicerelay.transceiver.auth import API_KEY_FILE, MAX_TOKEN_LIFETIME, read_api_key

    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{url!r} is not a signaling URL: write e.g. {DEFAULT_URL}", param_hint="URL"
        )
    if not 1 <= expires_in <= MAX_TOKEN_LIFETIME:
        raise click.BadParameter(f"use 1-{MAX_TOKEN_LIFETIME} s", param_hint="--expires-in")
    key = api_key or read_api_key((state_dir or default_state_dir()) / API_KEY_FILE)
    answer = mint(url.rstrip("/"), key, expires_in)
    if as_json:
        click.echo(json.dumps(answer))
    elif page:
        click.echo(f"{url.rstrip('/')}/#token={answer['value']}")
    else:
        click.echo(answer["value"])


def mint(url: str, api_key: str, expires_in: int, timeout: float = 5.0) -> dict:
    """POST /v1/client_tokens; the answer's JSON, or a one-line ClickException."""
    request = urllib.request.Request(
        url + "/v1/client_tokens",
        data=json.dumps({"expires_in": expires_in}).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        line = exc.read(300).decode("utf-8", "replace").strip().splitlines()[:1] or [exc.reason]
        raise click.ClickException(f"signaling refused: HTTP {exc.code} {line[0]}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"signaling at {url} is unreachable: {reason}") from None
    except ValueError:
        raise click.ClickException(f"signaling at {url} did not answer with JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("value"), str):
        raise click.ClickException(f"signaling at {url} answered without a token")
    return answer


commands: list[click.Command] = [token]
