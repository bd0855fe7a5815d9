"""Relay configuration: one dataclass, filled from CLI options and VOICERELAY_* variables."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from voicerelay.config import (
    DEFAULT_HOST,
    DEFAULT_INTERNAL_PORT_BASE,
    DEFAULT_PUBLIC_PORT,
    ConfigError,
    IpNetwork,
    check_cluster_id,
    default_state_dir,
    parse_networks,
    secret_path,
)

# Where transceivers may live (checked on snapshot restore): loopback, RFC 1918, ULA. Never a
# public network by default: a restored flow must not make the relay send to the Internet.
DEFAULT_TRANSCEIVER_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


def parse_cluster_routes(routes: str | tuple[str, ...] | list[str]) -> dict[int, tuple[str, int]]:
    """`ID=HOST:PORT` entries (a tuple, or one comma-separated string) as {cluster id: relay
    ingress}; ConfigError (one line) names the bad entry. HOST is an IP literal ([v6] ok)."""
    items = routes.split(",") if isinstance(routes, str) else list(routes)
    parsed: dict[int, tuple[str, int]] = {}
    fix = "use ID=HOST:PORT[,ID=HOST:PORT...], e.g. 2=10.0.2.1:3478"
    for item in (i.strip() for i in items):
        if not item:
            continue
        cid, eq, hostport = item.partition("=")
        host, colon, port = hostport.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            cluster, number = int(cid), int(port)
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"--cluster-routes entry {item!r} is not ID=HOST:PORT: {fix}"
            ) from None
        if not eq or not colon or not 1 <= number <= 65535:
            raise ConfigError(f"--cluster-routes entry {item!r} is not ID=HOST:PORT: {fix}")
        check_cluster_id(cluster)
        if cluster in parsed:
            raise ConfigError(f"--cluster-routes names cluster {cluster} twice: {fix}")
        parsed[cluster] = (host, number)
    return parsed


def check_redis_url(url: str) -> None:
    """ConfigError (one line) unless `url` is redis://host:port/db (or rediss://, unix://)."""
    fix = "use redis://host:port/db"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis url {url!r} is not a Redis URL: {fix}")
    parts = urlsplit(url)
    try:
        _ = parts.port  # urlsplit parses the port only when it is read
    except ValueError:
        port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        if port.isdigit():
            raise ConfigError(f"redis url {url!r}: port {port} is out of range: {fix}") from None
        raise ConfigError(f"redis url {url!r} has no numeric port ({port!r}): {fix}") from None
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        raise ConfigError(f"redis url {url!r}: database {db!r} is not a number: {fix}")


@dataclass
class RelayConfig:
    """Everything a launcher and its workers need to know."""

    listen_host: str = DEFAULT_HOST
    listen_port: int = DEFAULT_PUBLIC_PORT
    internal_host: str = DEFAULT_HOST
    internal_port_base: int = DEFAULT_INTERNAL_PORT_BASE
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    capacity: int = 65536  # flows per worker shard
    idle_timeout: float = 30.0
    state_dir: Path = field(default_factory=default_state_dir)
    secret_file: Path | None = None  # default: <state_dir>/secret.key
    redis_url: str | None = None
    snapshot_interval: float = 1.0
    cluster_id: int = 0
    pin_cpus: bool = True
    transceiver_networks: tuple[str, ...] = DEFAULT_TRANSCEIVER_NETWORKS
    # Admission of new flows (relay/router.py): token first-use window (s), client addresses
    # per token, new flows a second per source prefix (/24, /64; 0: no limit) and burst, how
    # long a flow's return traffic must be silent before it may move, and how long a flow
    # that never carried return traffic lives.
    token_window: float = 30.0
    token_clients: int = 4
    new_flow_rate: float = 100.0
    new_flow_burst: int = 200
    rebind_after: float = 10.0
    unanswered_timeout: float = 10.0
    # ICE over TCP (relay/tcp.py): the TCP port each worker also listens on at listen_host
    # (0: off; 443 in production) and the connections one worker keeps at most.
    tcp_port: int = 0
    tcp_connections: int = 1024
    # Prometheus /metrics, /healthz and /readyz from the launcher (`--metrics HOST:PORT`);
    # metrics_port None: not served; 0: any free port.
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None
    # Global hop (relay/router.py): other clusters' relay ingresses ("ID=HOST:PORT" each;
    # `--cluster-routes`) and the relay-to-relay hops a datagram may take (0: none, 1: one).
    cluster_routes: tuple[str, ...] = ()
    hop_limit: int = 1
    # Upstream relays (CIDR networks) whose hop envelopes this relay takes (`--hop-peers`);
    # none by default: an envelope names its client, so only trusted relays may send one.
    hop_peers: tuple[str, ...] = ()
    # Kernel fast path (relay/fastpath): established IPv4 flows forwarded by a tc eBPF program.
    kernel_fast_path: bool = False

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.secret_file is not None:
            self.secret_file = Path(self.secret_file).expanduser()
        self.validate()

    # Passing to another process ---------------------------------------------------------
    def to_json(self) -> str:
        """The config as one JSON argument (how `relayctl up` hands it to a launcher)."""
        fields = dataclasses.asdict(self)
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()})

    @classmethod
    def from_json(cls, text: str) -> RelayConfig:
        """The config `to_json` wrote, validated again."""
        return cls(**json.loads(text))

    # Derived names ----------------------------------------------------------------------
    @property
    def secret_path(self) -> Path:
        return secret_path(self.state_dir, self.secret_file)

    @property
    def networks(self) -> tuple[IpNetwork, ...]:
        """`transceiver_networks` as networks (validated in __post_init__), and each routed
        cluster's ingress (a restored flow of the global hop names it)."""
        routed = tuple(ipaddress.ip_network(host) for host, _ in self.routes.values())
        return tuple(ipaddress.ip_network(n) for n in self.transceiver_networks) + routed

    @property
    def shm_name(self) -> str:
        """Flow-table segment name; one relay per public port on a host."""
        return f"voicerelay-{self.listen_port}-flows"

    @property
    def counters_name(self) -> str:
        return f"voicerelay-{self.listen_port}-stats"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / f"relay-{self.listen_port}.sock"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"relay-{self.listen_port}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"relay-{self.listen_port}.log"

    @property
    def snapshot_file(self) -> Path:
        return self.state_dir / f"relay-{self.listen_port}.snapshot"

    @property
    def hop_peer_networks(self) -> tuple[IpNetwork, ...]:
        """`hop_peers` as networks (empty: no hop envelopes are taken)."""
        return tuple(ipaddress.ip_network(n) for n in self.hop_peers)

    @property
    def routes(self) -> dict[int, tuple[str, int]]:
        """`cluster_routes` as {cluster id: relay ingress} (validated in __post_init__)."""
        return parse_cluster_routes(self.cluster_routes)

    def internal_addr(self, index: int) -> tuple[str, int]:
        """The internal (towards transceivers) address of worker `index`; stable across restarts."""
        return (self.internal_host, self.internal_port_base + index)

    # Validation -------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("listen_host", "internal_host"):
            value = getattr(self, name)
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(
                    f"{name.replace('_', '-')} {value!r} is not an IP address: give a literal "
                    "address such as 127.0.0.1 or ::1"
                ) from None
        if not 1 <= self.listen_port <= 65535:
            raise ConfigError(f"port {self.listen_port} is out of range: use 1-65535")
        if not 1 <= self.internal_port_base <= 65535 - max(self.workers, 1) + 1:
            raise ConfigError(
                f"internal port base {self.internal_port_base} leaves no room for "
                f"{self.workers} workers: use a value below {65536 - self.workers}"
            )
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"workers {self.workers} is out of range: use 1-256")
        if not 16 <= self.capacity <= 1 << 24:
            raise ConfigError(f"capacity {self.capacity} is out of range: use 16-16777216")
        if not 0.05 <= self.idle_timeout <= 86400:
            raise ConfigError(f"idle timeout {self.idle_timeout} is out of range: use 0.05-86400 s")
        if not 0.05 <= self.snapshot_interval <= 3600:
            raise ConfigError(
                f"snapshot interval {self.snapshot_interval} is out of range: use 0.05-3600 s"
            )
        if not 0 <= self.tcp_port <= 65535:
            raise ConfigError(
                f"--tcp-port {self.tcp_port} is out of range: use 1-65535, or 0 for off"
            )
        if not 1 <= self.tcp_connections <= 1_000_000:
            raise ConfigError(
                f"--tcp-connections {self.tcp_connections} is out of range: use 1-1000000"
            )
        check_cluster_id(self.cluster_id)
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        self._validate_admission()
        self._validate_hop()
        if isinstance(self.hop_peers, str):
            self.hop_peers = tuple(p for p in self.hop_peers.split(",") if p.strip())
        if self.hop_peers:
            self.hop_peers = tuple(
                str(n) for n in parse_networks(self.hop_peers, "--hop-peers", "10.1.0.0/16")
            )
        self.transceiver_networks = tuple(
            str(n) for n in parse_networks(self.transceiver_networks, "--transceiver-networks")
        )

    def _validate_hop(self) -> None:
        if isinstance(self.cluster_routes, str):
            self.cluster_routes = tuple(self.cluster_routes.split(","))
        routes = parse_cluster_routes(self.cluster_routes)
        self.cluster_routes = tuple(
            f"{c}={h}:{p}" if ":" not in h else f"{c}=[{h}]:{p}" for c, (h, p) in routes.items()
        )
        if self.cluster_id in routes:
            raise ConfigError(
                f"--cluster-routes names this relay's own cluster {self.cluster_id}: "
                "route only the other clusters"
            )
        if self.hop_limit not in (0, 1):
            raise ConfigError(
                f"--hop-limit {self.hop_limit} is out of range: use 0 (no hop) or 1 (one hop; "
                "the envelope carries no hop count, so longer chains are refused)"
            )

    def _validate_admission(self) -> None:
        ranges = (
            ("token window", "token_window", 1, 86400, " s"),
            ("token clients", "token_clients", 1, 64, ""),
            ("new flow rate", "new_flow_rate", 0, 1000000, " a second (0: no limit)"),
            ("new flow burst", "new_flow_burst", 1, 1000000, ""),
            ("rebind after", "rebind_after", 0, 3600, " s"),
            ("unanswered timeout", "unanswered_timeout", 0.05, 86400, " s"),
        )
        for what, name, low, high, unit in ranges:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{what} {value} is out of range: use {low}-{high}{unit}")
