"""What every `relayctl` verb shares: value checks that fail in one line naming the option
(`parse_hostport`, `check_port`, `usable_state_dir`) and the options several verbs take."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from voicerelay.config import DEFAULT_HOST, DEFAULT_PUBLIC_PORT, ConfigError

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]


# Values ---------------------------------------------------------------------------------------
def parse_hostport(
    text: str,
    option: str,
    default_port: int | None = None,
    *,
    example_port: int | None = None,
    min_port: int = 1,
) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, or `HOST` when a default port exists.

    Errors (ConfigError, one line) name `option` and show an example with the option's own
    port (`example_port`, else `default_port`).
    """
    example = example_port or default_port or DEFAULT_PUBLIC_PORT
    text = text.strip()
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep or (":" in host and not host.startswith("[")):
        if default_port is None or (":" in text and not text.startswith("[")):
            raise ConfigError(
                f"{option} {text!r} is not HOST:PORT: write e.g. {DEFAULT_HOST}:{example} "
                f"or [::1]:{example}"
            )
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not port.isdigit():
        raise ConfigError(
            f"{option} {text!r} has no numeric port: write e.g. {DEFAULT_HOST}:{example}"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{option} host {host!r} is not an IP address: write a literal such as "
            f"{DEFAULT_HOST}:{example} or [::1]:{example}"
        ) from None
    return host, check_port(int(port), f"{option} port", min_port)


def check_port(port: int, what: str, min_port: int = 1) -> int:
    """`port` if it is a usable port number, else a one-line ConfigError naming `what`."""
    if not min_port <= port <= 65535:
        raise ConfigError(f"{what} {port} is out of range: use {min_port}-65535")
    return port


def usable_state_dir(path: Path) -> Path:
    """Create the state directory if needed; a one-line ConfigError if it cannot be used."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the secret
    except OSError as exc:
        raise ConfigError(
            f"--state-dir {path} cannot be used ({exc.strerror}): choose a writable directory"
        ) from None
    return path


# Options --------------------------------------------------------------------------------------
def options(*decorators: Decorator) -> Decorator:
    """Several click options as one decorator, listed in the order `--help` shows them."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def state_dir_option(holds: str) -> Decorator:
    """`--state-dir` (VOICERELAY_STATE_DIR); `holds` says what this verb keeps there."""
    return click.option(
        "--state-dir",
        envvar="VOICERELAY_STATE_DIR",
        type=click.Path(path_type=Path),
        default=None,
        help=f"{holds} [default: ~/.local/state/voicerelay].",
    )


def secret_file_option(detail: str) -> Decorator:
    """`--secret-file` (VOICERELAY_SECRET_FILE): the routing-token keys."""
    return click.option(
        "--secret-file",
        envvar="VOICERELAY_SECRET_FILE",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Routing-token keys {detail}.",
    )


def cluster_id_option() -> Decorator:
    """`--cluster-id` (VOICERELAY_CLUSTER_ID)."""
    return click.option(
        "--cluster-id",
        envvar="VOICERELAY_CLUSTER_ID",
        type=int,
        default=0,
        show_default=True,
        help="This cluster's id in routing tokens.",
    )


def workers_option(what: str) -> Decorator:
    """`--workers` (VOICERELAY_WORKERS): relay worker processes, None for one per core."""
    return click.option(
        "--workers",
        envvar="VOICERELAY_WORKERS",
        type=int,
        default=None,
        help=f"{what} [default: one per core].",
    )


def kernel_fast_path_option() -> Decorator:
    """`--kernel-fast-path` (VOICERELAY_KERNEL_FAST_PATH): the relay's eBPF forwarding."""
    return click.option(
        "--kernel-fast-path",
        is_flag=True,
        envvar="VOICERELAY_KERNEL_FAST_PATH",
        help="Forward established IPv4 flows in the kernel (a tc eBPF program; needs root, "
        "clang and libbpf-dev); STUN, new flows and expiry stay with the workers. When it "
        "cannot run, the relay says why in one line and forwards in userspace.",
    )


def consent_timeout_option(*, from_env: bool) -> Decorator:
    """`--consent-timeout`: how long a call lives without a consent check; `from_env`: also
    read VOICERELAY_CONSENT_TIMEOUT."""
    return click.option(
        "--consent-timeout",
        envvar="VOICERELAY_CONSENT_TIMEOUT" if from_env else None,
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds without a consent check before a call ends (RFC 7675: 30; "
        "browsers check every ~5 s, so stay well above that).",
    )


def api_key_option(
    help: str = "Signaling's API key (Authorization: Bearer; it also mints client tokens). "
    "Giving one turns authentication on; beyond loopback it is always on, and without a key "
    "the transceiver keeps one in <state-dir>/api.key.",
) -> Decorator:
    """`--api-key` (VOICERELAY_API_KEY): signaling's API key (docs/SIGNALING.md)."""
    return click.option("--api-key", envvar="VOICERELAY_API_KEY", default=None, help=help)


def signaling_auth_options() -> Decorator:
    """`--api-key`, `--require-auth` and `--cors-origin`: who may call signaling."""
    return options(
        api_key_option(),
        click.option(
            "--require-auth",
            envvar="VOICERELAY_REQUIRE_AUTH",
            is_flag=True,
            default=False,
            help="Authenticate signaling on loopback too (beyond loopback it always is).",
        ),
        click.option(
            "--cors-origin",
            "cors_origins",
            envvar="VOICERELAY_CORS_ORIGIN",
            multiple=True,
            help="An origin whose pages may call signaling (https://app.example.com); repeat "
            "it or separate with commas. Default: none (same-origin pages only).",
        ),
    )


def tls_options() -> Decorator:
    """`--https`, `--cert` and `--key`: serve signaling and the page over HTTPS."""
    return options(
        click.option(
            "--https",
            envvar="VOICERELAY_HTTPS",
            is_flag=True,
            default=False,
            help="Serve signaling and the page over HTTPS with a self-signed certificate made "
            "on first use in the state directory (https.crt, key https.key 0600): browsers on "
            "other hosts need a secure context for the microphone.",
        ),
        click.option(
            "--cert",
            envvar="VOICERELAY_CERT",
            type=click.Path(path_type=Path),
            default=None,
            help="Serve HTTPS with this PEM certificate (chain) instead; needs --key.",
        ),
        click.option(
            "--key",
            envvar="VOICERELAY_KEY",
            type=click.Path(path_type=Path),
            default=None,
            help="The PEM private key of --cert (unencrypted).",
        ),
    )


def tls_files(
    https: bool, cert: Path | None, key: Path | None, state_dir: Path, hosts: list[str]
) -> tuple[Path | None, Path | None, str | None]:
    """The certificate and key to serve (None, None: plain HTTP) and a line for the operator:
    the user's pair, or with `--https` the state directory's self-signed one (made now if
    needed, naming `hosts`). ConfigError (one line) for a wrong combination."""
    from voicerelay.tls import ensure_self_signed, server_context

    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together: give both, or --https for one made here")
    if cert is not None and key is not None:
        server_context(cert, key)  # unusable files fail here, before anything starts
        return cert, key, f"https: the certificate {cert}"
    if not https:
        return None, None, None
    made = ensure_self_signed(state_dir, hosts)
    what = "made now" if made.created else "kept"
    return (
        made.cert,
        made.key,
        f"https: self-signed certificate {made.cert} ({what}; SHA-256 {made.fingerprint}): "
        "a browser asks once to accept it; `relayctl call --cafile` trusts it",
    )
