"""Transceiver configuration, validated into one-line errors."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from voicerelay.addresses import check_advertised
from voicerelay.config import (
    DEFAULT_AGENT_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_TRANSCEIVER_PORT,
    ConfigError,
    IpNetwork,
    check_cluster_id,
    default_state_dir,
    parse_networks,
    secret_path,
)
from voicerelay.transceiver.auth import API_KEY_FILE, check_api_key, parse_origins
from voicerelay.transceiver.ratelimit import DEFAULT_BURST, DEFAULT_RATE
from voicerelay.wire.addr import Addr

DEFAULT_RELAYS = ("127.0.0.0/8", "::1/128")  # the local stack's relay sends from loopback


def relay_addresses(
    value: Addr | Iterable[Addr], option: str = "--relay-public"
) -> tuple[Addr, ...]:
    """The relay's public addresses as answers list them: one (host, port) or several, each
    an address clients can send to (no wildcard) with a port 1-65535, repeats dropped; a
    one-line ConfigError naming `option` otherwise."""
    items = list(value)
    if len(items) == 2 and isinstance(items[0], str):
        items = [value]  # one address
    if not items:
        raise ConfigError(f"{option} is empty: name the relay's public HOST:PORT")
    out: list[Addr] = []
    for host, port in items:
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"{option} port {port} is out of range: use 1-65535")
        out.append((check_advertised(str(host), None, option), int(port)))
    return tuple(dict.fromkeys(out))


@dataclass
class TransceiverConfig:
    internal: Addr = (DEFAULT_HOST, DEFAULT_TRANSCEIVER_PORT)  # the relay sends envelopes here
    http: Addr = (DEFAULT_HOST, DEFAULT_HTTP_PORT)  # signaling and the demo page
    # The relay's public addresses: every one is a candidate in answers, in this order (one
    # Addr is taken as a list of one).
    relay_public: tuple[Addr, ...] = ((DEFAULT_HOST, DEFAULT_PUBLIC_PORT),)
    state_dir: Path = field(default_factory=default_state_dir)
    secret_file: Path | None = None
    cluster_id: int = 0
    consent_timeout: float = 30.0
    connect_timeout: float = 10.0  # a session not secure this soon is closed (never-connected)
    max_sessions: int = 2000
    relays: tuple[str, ...] = DEFAULT_RELAYS  # who may send envelopes: addresses or networks
    agent_url: str | None = None  # a Realtime-compatible backend (ws/wss); None: echo calls
    agent_key: str | None = None  # its API key (Authorization: Bearer)
    api_key: str | None = None  # signaling's API key; None: <state_dir>/api.key when auth is on
    require_auth: bool = False  # authenticate on loopback too (beyond loopback it always is)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call signaling (CORS)
    session_rate: float = DEFAULT_RATE  # new sessions a second per client (IPv4, IPv6 /64); 0: off
    session_burst: int = DEFAULT_BURST  # ... and how many at once
    tls_cert: Path | None = None  # serve signaling and the page over HTTPS with this certificate
    tls_key: Path | None = None  # ... and its private key (both or neither)
    # The relay's ICE-TCP port (`relayctl start --tcp-port`): answers list a passive TCP
    # candidate there on each relay address, after the UDP ones. 0: the relay serves no TCP.
    relay_tcp_port: int = 0
    # Global hop: named edge ingresses; signaling advertises the one a request's
    # X-Voicerelay-Ingress header names (e.g. set by geo-steering), else `relay_public`.
    ingresses: tuple[tuple[str, Addr], ...] = ()

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.secret_file is not None:
            self.secret_file = Path(self.secret_file).expanduser()
        for name in ("internal", "http"):
            host, port = getattr(self, name)
            option = "--" + name.replace("_", "-")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    f"{option} host {host!r} is not an IP address: use e.g. 127.0.0.1"
                ) from None
            if not 0 <= port <= 65535:
                raise ConfigError(f"{option} port {port} is out of range: use 1-65535")
        self.relay_public = relay_addresses(self.relay_public)
        self.ingresses = tuple(
            (name, relay_addresses(addr, "--ingress")[0]) for name, addr in self.ingresses
        )
        self._check_tls()
        if not 0.5 <= self.consent_timeout <= 3600:
            raise ConfigError(
                f"consent timeout {self.consent_timeout} is out of range: use 0.5-3600 s"
            )
        if not 0.5 <= self.connect_timeout <= 3600:
            raise ConfigError(
                f"--connect-timeout {self.connect_timeout} is out of range: use 0.5-3600 s"
            )
        relays = self.relays.split(",") if isinstance(self.relays, str) else self.relays
        self.relays = tuple(
            str(n) for n in parse_networks(relays, "--relays", "127.0.0.0/8,10.1.2.3")
        )
        if not 1 <= self.max_sessions <= 1_000_000:
            raise ConfigError(f"max sessions {self.max_sessions} is out of range: use 1-1000000")
        if self.agent_url is not None and not self.agent_url.startswith(("ws://", "wss://")):
            raise ConfigError(
                f"--agent-url {self.agent_url!r} is not a WebSocket URL: "
                f"write e.g. ws://{DEFAULT_HOST}:{DEFAULT_AGENT_PORT}/v1/realtime"
            )
        check_cluster_id(self.cluster_id)
        if self.api_key is not None:
            check_api_key(self.api_key)
        self.cors_origins = parse_origins(self.cors_origins)
        if not 0 <= self.session_rate <= 1000:
            raise ConfigError(f"--session-rate {self.session_rate} is out of range: use 0-1000")
        if not 1 <= self.session_burst <= 100_000:
            raise ConfigError(f"--session-burst {self.session_burst} is out of range: use 1-100000")
        if not 0 <= self.relay_tcp_port <= 65535:
            raise ConfigError(
                f"--tcp-port {self.relay_tcp_port} is out of range: use 1-65535, or 0 for none"
            )

    def _check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "--cert and --key go together: give both, or --https for one made here"
            )
        if self.tls_cert is not None and self.tls_key is not None:
            self.tls_cert = Path(self.tls_cert).expanduser()
            self.tls_key = Path(self.tls_key).expanduser()

    @property
    def https(self) -> bool:
        """Signaling and the page are served over HTTPS."""
        return self.tls_cert is not None

    @property
    def relay_networks(self) -> tuple[IpNetwork, ...]:
        """`relays` as networks (validated in __post_init__)."""
        return tuple(ipaddress.ip_network(r) for r in self.relays)

    @property
    def secret_path(self) -> Path:
        return secret_path(self.state_dir, self.secret_file)

    @property
    def auth_enabled(self) -> bool:
        """Signaling authenticates: always beyond loopback, on loopback if asked (a key given,
        or `require_auth`)."""
        beyond_loopback = not ipaddress.ip_address(self.http[0]).is_loopback
        return beyond_loopback or self.require_auth or self.api_key is not None

    @property
    def api_key_path(self) -> Path:
        """Where the API key is kept when none is given: created 0600 on first use."""
        return self.state_dir / API_KEY_FILE

    def advertised(self, ingress: str | None) -> tuple[Addr, ...]:
        """The relay addresses an answer lists: the named ingress, if it is one of ours, else
        `relay_public`."""
        for name, addr in self.ingresses:
            if name == ingress:
                return (addr,)
        return self.relay_public
