"""What every part's configuration shares: the error for a wrong value, where state lives, the
default addresses, and the rules both the relay and the transceiver apply."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PUBLIC_PORT = 3478  # the relay's public UDP port: clients send here
DEFAULT_INTERNAL_PORT_BASE = 4000  # relay worker i's UDP port towards transceivers: base + i
DEFAULT_TRANSCEIVER_PORT = 5000  # the transceiver's UDP port for envelopes from the relay
DEFAULT_HTTP_PORT = 8080  # signaling and the demo page
DEFAULT_AGENT_PORT = 8765  # the reference agent's WebSocket
SECRET_NAME = "secret.key"  # the routing secret's default name in the state directory


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the fix in one line."""


def default_state_dir() -> Path:
    """Where the embedded defaults live: secret, snapshot file, pid file, control socket."""
    env = os.environ.get("VOICERELAY_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "voicerelay"


def secret_path(state_dir: Path, secret_file: Path | None = None) -> Path:
    """The routing secret: `secret_file` if given, else `<state_dir>/secret.key`."""
    return secret_file or state_dir / SECRET_NAME


def check_cluster_id(cluster_id: int) -> None:
    """The cluster id routing tokens carry (u16); ConfigError if out of range."""
    if not 0 <= cluster_id <= 65535:
        raise ConfigError(f"cluster id {cluster_id} is out of range: use 0-65535")


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(
    entries: str | Iterable[str], option: str, example: str = "10.0.0.0/8,fd00::/8"
) -> tuple[IpNetwork, ...]:
    """Addresses or CIDR networks (a list, or one comma-separated string: `10.0.0.7`,
    `10.0.0.0/8`, `fd00::/8`); a one-line ConfigError naming `option` for a bad entry or an
    empty list."""
    if isinstance(entries, str):
        entries = entries.split(",")
    networks = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue  # "a,,b" or a trailing comma
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"{option} entry {entry!r} is not an IP address or network: write e.g. {example}"
            ) from None
    if not networks:
        raise ConfigError(f"{option} is empty: list e.g. {example}")
    return tuple(networks)
