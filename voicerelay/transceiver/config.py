"""Transceiver configuration, validated into one-line errors."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from voicerelay.config import (
    DEFAULT_AGENT_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_TRANSCEIVER_PORT,
    ConfigError,
    check_cluster_id,
    default_state_dir,
    secret_path,
)
from voicerelay.wire.addr import Addr


@dataclass
class TransceiverConfig:
    internal: Addr = (DEFAULT_HOST, DEFAULT_TRANSCEIVER_PORT)  # the relay sends envelopes here
    http: Addr = (DEFAULT_HOST, DEFAULT_HTTP_PORT)  # signaling and the demo page
    relay_public: Addr = (DEFAULT_HOST, DEFAULT_PUBLIC_PORT)  # the only candidate in answers
    state_dir: Path = field(default_factory=default_state_dir)
    secret_file: Path | None = None
    cluster_id: int = 0
    consent_timeout: float = 30.0
    max_sessions: int = 2000
    agent_url: str | None = None  # a Realtime-compatible backend (ws/wss); None: echo calls
    agent_key: str | None = None  # its API key (Authorization: Bearer)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.secret_file is not None:
            self.secret_file = Path(self.secret_file).expanduser()
        for name in ("internal", "http", "relay_public"):
            host, port = getattr(self, name)
            option = "--" + name.replace("_", "-")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    f"{option} host {host!r} is not an IP address: use e.g. 127.0.0.1"
                ) from None
            if not 0 <= port <= 65535 or (name == "relay_public" and port == 0):
                raise ConfigError(f"{option} port {port} is out of range: use 1-65535")
        if not 0.5 <= self.consent_timeout <= 3600:
            raise ConfigError(
                f"consent timeout {self.consent_timeout} is out of range: use 0.5-3600 s"
            )
        if not 1 <= self.max_sessions <= 1_000_000:
            raise ConfigError(f"max sessions {self.max_sessions} is out of range: use 1-1000000")
        if self.agent_url is not None and not self.agent_url.startswith(("ws://", "wss://")):
            raise ConfigError(
                f"--agent-url {self.agent_url!r} is not a WebSocket URL: "
                f"write e.g. ws://{DEFAULT_HOST}:{DEFAULT_AGENT_PORT}/v1/realtime"
            )
        check_cluster_id(self.cluster_id)

    @property
    def secret_path(self) -> Path:
        return secret_path(self.state_dir, self.secret_file)
