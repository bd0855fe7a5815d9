"""Flow-table snapshots for restart recovery: a sealed msgpack codec, two stores, a snapshotter
thread, and the restore that trusts nothing it did not seal itself.

A snapshot is `MAGIC | version | key id | nonce | AES-GCM(body)` (docs/SNAPSHOTS.md). The key
comes from the cluster secret through HKDF with a label of its own (never the token key itself),
one per key id, so a secret rotation keeps opening snapshots sealed before it; the associated
data binds a snapshot to one relay (cluster id and public port). Whoever can write the snapshot
file or the Redis key but does not hold the secret can neither forge flows nor read the client
addresses inside.

Body (msgpack map): `{"format": "voicerelay-flows", "v": 2, "wall": <unix time taken>,
"flows": [[client host, client port, transceiver host, transceiver port, idle age s, packets in,
packets out], ...]}`. Monotonic clocks do not survive a reboot, so each flow carries its idle
age; restore adds the downtime and drops flows that went idle past the timeout meanwhile. Every
transceiver must lie in the configured transceiver networks. A snapshot that fails any check is
refused whole (one log line, shown in `relayctl stats`), never half-loaded.

Stores: `FileStore` (the embedded default, atomic replace, mode 0600) and `RedisStore` (one key
with an expiry). The `Snapshotter` runs in its own thread: a slow or dead Redis delays only
snapshots, never the launcher's event loop, and never forwarding (the worker processes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from voicerelay.config import ConfigError, IpNetwork
from voicerelay.relay.config import DEFAULT_TRANSCEIVER_NETWORKS, RelayConfig
from voicerelay.shm.flowtable import FlowRecord, FlowTable, TableFull, client_key
from voicerelay.wire.addr import Addr

log = logging.getLogger("voicerelay.snapshot")

FORMAT = "voicerelay-flows"
VERSION = 2
MAGIC = b"VRSN"
SEAL_LABEL = b"voicerelay flow-snapshot seal v2"  # HKDF info: this key is for nothing else
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct("!4sBB")  # magic, version, key id
MAX_BACKOFF = 5.0
BYTES_PER_FLOW = 160  # a generous bound on one encoded flow (IPv6 both ends, sealed)
DEFAULT_NETWORKS: tuple[IpNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in DEFAULT_TRANSCEIVER_NETWORKS
)


class SnapshotError(ValueError):
    """A snapshot cannot be used (unsealed, tampered, corrupt, unknown version) or stored."""


# Seal ----------------------------------------------------------------------------------------


def read_secret(path: str | os.PathLike[str]) -> tuple[dict[int, bytes], int]:
    """The cluster secret's keys by id and the current (first) id, from the secret file's
    `<key id> <hex key>` lines; raises SnapshotError (the file's own checks run at start)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("ascii")
    except OSError as exc:
        raise SnapshotError(f"cannot read the secret {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SnapshotError(f"the secret {p} is not text") from None
    keys: dict[int, bytes] = {}
    current: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            kid, key = int(fields[0]), bytes.fromhex(fields[1])
        except (ValueError, IndexError):
            raise SnapshotError(f"{p}:{number} is not '<key id> <hex key>'") from None
        keys[kid] = key
        current = kid if current is None else current
    if current is None:
        raise SnapshotError(f"the secret {p} holds no key")
    return keys, current


class SnapshotSeal:
    """AES-GCM over an encoded snapshot with keys derived from the cluster secret.

    `secrets` are the secret's keys by id (`current` seals, all open); `context` is bound as
    associated data (which relay the snapshot belongs to). Pure: the nonce is random per seal
    unless given.
    """

    def __init__(self, secrets: Mapping[int, bytes], current: int, context: bytes = b"") -> None:
        if current not in secrets:
            raise ValueError(f"current key id {current} is not among the keys")
        self._aeads = {kid: AESGCM(derive_key(key)) for kid, key in secrets.items()}
        self.current = current
        self.context = context

    @classmethod
    def from_secret_file(cls, path: str | os.PathLike[str], context: bytes) -> SnapshotSeal:
        """The seal of the cluster secret at `path`; raises SnapshotError."""
        keys, current = read_secret(path)
        return cls(keys, current, context)

    def seal(self, body: bytes, nonce: bytes | None = None) -> bytes:
        """`body` sealed with the current key."""
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        header = _HEADER.pack(MAGIC, VERSION, self.current)
        return header + nonce + self._aeads[self.current].encrypt(nonce, body, self._aad(header))

    def open(self, blob: bytes) -> bytes:
        """The body of a sealed snapshot; raises SnapshotError naming why it is refused."""
        if len(blob) < _HEADER.size or blob[:4] != MAGIC:
            raise SnapshotError("not sealed with the cluster secret (an unsealed or foreign file)")
        _, version, kid = _HEADER.unpack_from(blob)
        if version != VERSION:
            raise SnapshotError(f"sealed snapshot format version {version} is not {VERSION}")
        aead = self._aeads.get(kid)
        if aead is None:
            raise SnapshotError(f"sealed with key id {kid}, which the cluster secret does not hold")
        if len(blob) < _HEADER.size + NONCE_SIZE + TAG_SIZE:
            raise SnapshotError("truncated before its seal")
        header, nonce = blob[: _HEADER.size], blob[_HEADER.size : _HEADER.size + NONCE_SIZE]
        try:
            return aead.decrypt(nonce, blob[_HEADER.size + NONCE_SIZE :], self._aad(header))
        except InvalidTag:
            raise SnapshotError(
                f"its seal does not verify with key {kid} of the cluster secret (tampered with, "
                "truncated, another relay's, or another secret's)"
            ) from None

    def _aad(self, header: bytes) -> bytes:
        return header + self.context


def derive_key(secret: bytes) -> bytes:
    """The snapshot key of one secret key: HKDF-SHA256 with the snapshot label."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_LABEL).derive(secret)


def relay_context(config: RelayConfig) -> bytes:
    """What a relay's snapshots are bound to: its cluster and public port."""
    return f"cluster {config.cluster_id} relay port {config.listen_port}".encode()


def seal_for(config: RelayConfig) -> SnapshotSeal:
    """The seal of this relay's snapshots; ConfigError (one line) if the secret cannot key it."""
    try:
        return SnapshotSeal.from_secret_file(config.secret_path, relay_context(config))
    except SnapshotError as exc:
        raise ConfigError(f"snapshots cannot be sealed: {exc}") from None


# Codec ---------------------------------------------------------------------------------------


def encode_flows(records: Iterable[FlowRecord], now: float, wall: float | None = None) -> bytes:
    """The snapshot body; `now` is the monotonic clock the records' last_seen refer to."""
    flows = [
        [
            r.client[0],
            r.client[1],
            r.transceiver[0],
            r.transceiver[1],
            max(0.0, now - r.last_seen),
            r.packets_in,
            r.packets_out,
        ]
        for r in records
    ]
    wall = time.time() if wall is None else wall
    return msgpack.packb({"format": FORMAT, "v": VERSION, "wall": wall, "flows": flows})


def encode_snapshot(
    records: Iterable[FlowRecord], now: float, seal: SnapshotSeal, wall: float | None = None
) -> bytes:
    """A sealed snapshot of `records`."""
    return seal.seal(encode_flows(records, now, wall))


def _valid_addr(host: Any, port: Any) -> bool:
    return isinstance(host, str) and isinstance(port, int) and 1 <= port <= 65535


def _valid_flow(flow: Any) -> bool:
    return (
        isinstance(flow, list)
        and len(flow) == 7
        and _valid_addr(flow[0], flow[1])
        and _valid_addr(flow[2], flow[3])
        and isinstance(flow[4], int | float)
        and flow[4] >= 0
        and isinstance(flow[5], int)
        and isinstance(flow[6], int)
    )


def in_networks(host: str, networks: Sequence[IpNetwork]) -> bool:
    """Does `host` (an IPv4-mapped IPv6 address as the IPv4 it reaches) lie in `networks`?"""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class _Verdicts(dict[str, bool]):
    """host -> in `networks`?, computed once per host."""

    def __init__(self, networks: Sequence[IpNetwork]) -> None:
        super().__init__()
        self.networks = networks

    def __missing__(self, host: str) -> bool:
        self[host] = verdict = in_networks(host, self.networks)
        return verdict


def _record(
    i: int, flow: list, now: float, age: float, inside_networks: dict[str, bool]
) -> FlowRecord:
    """Flow `i` as a record; `inside_networks` memoizes the network check per transceiver host
    (a snapshot names a few transceivers many times over) and must start empty per snapshot."""
    client, transceiver = (flow[0], flow[1]), (flow[2], flow[3])
    try:
        client_key(client)
        client_key(transceiver)
        inside = inside_networks[flow[2]]
    except ValueError:
        raise SnapshotError(f"flow {i} has a bad address") from None
    if not inside:
        raise SnapshotError(
            f"flow {i} names transceiver {flow[2]}:{flow[3]}, outside --transceiver-networks"
        )
    return FlowRecord(client, transceiver, now - age, flow[5] & 0xFFFFFFFF, flow[6] & 0xFFFFFFFF)


def decode_flows(
    body: bytes,
    now: float,
    *,
    networks: Sequence[IpNetwork] = DEFAULT_NETWORKS,
    wall_now: float | None = None,
    idle_timeout: float | None = None,
) -> list[FlowRecord]:
    """Flows of a snapshot body with last_seen on `now`'s clock; raises only `SnapshotError`."""
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise SnapshotError(f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError("not a voicerelay flow snapshot")
    if doc.get("v") != VERSION:
        raise SnapshotError(f"snapshot format version {doc.get('v')!r} is not {VERSION}: refused")
    wall, flows = doc.get("wall"), doc.get("flows")
    if not isinstance(wall, int | float) or not isinstance(flows, list):
        raise SnapshotError("snapshot header is damaged")
    downtime = max(0.0, (time.time() if wall_now is None else wall_now) - wall)
    inside_networks = _Verdicts(networks)
    records = []
    for i, flow in enumerate(flows):
        if not _valid_flow(flow):
            raise SnapshotError(f"flow {i} is damaged")
        age = flow[4] + downtime
        record = _record(i, flow, now, age, inside_networks)
        if idle_timeout is None or age <= idle_timeout:
            records.append(record)
    return records


def decode_snapshot(
    blob: bytes,
    now: float,
    seal: SnapshotSeal,
    *,
    networks: Sequence[IpNetwork] = DEFAULT_NETWORKS,
    wall_now: float | None = None,
    idle_timeout: float | None = None,
) -> list[FlowRecord]:
    """Flows of a sealed snapshot; raises only `SnapshotError` (unsealed, tampered, damaged,
    or a transceiver outside `networks`)."""
    return decode_flows(
        seal.open(blob), now, networks=networks, wall_now=wall_now, idle_timeout=idle_timeout
    )


# Stores --------------------------------------------------------------------------------------


class Store(Protocol):
    def save(self, blob: bytes) -> None: ...
    def load(self) -> bytes | None: ...
    def describe(self) -> str: ...


class FileStore:
    """A snapshot file under the state directory (mode 0600), replaced atomically."""

    backend = "file"

    def __init__(self, path: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes

    def save(self, blob: bytes) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, 0o600)  # a .tmp left behind by an older version may be 0644
                f.write(blob)
                f.flush()
                os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise SnapshotError(f"cannot write {self.path}: {exc.strerror}") from None

    def load(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                blob = f.read() if self.max_bytes is None else f.read(self.max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"cannot read {self.path}: {exc.strerror}") from None
        if self.max_bytes is not None and len(blob) > self.max_bytes:
            raise SnapshotError(f"larger than this relay's table could hold ({self.max_bytes} B)")
        return blob

    def describe(self) -> str:
        return f"file {self.path}"


class RedisStore:
    """One Redis key per relay (`voicerelay:{cluster}:relay:{port}:flows`) with an expiry."""

    backend = "redis"

    def __init__(self, url: str, key: str, ttl: int = 120, timeout: float = 0.5) -> None:
        self.url = url
        self.key = key
        self.ttl = ttl
        try:
            self.client = redis.Redis.from_url(
                url, socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False
            )
        except ValueError as exc:  # what the URL check before this does not know about
            raise ConfigError(f"redis url {url!r}: {exc}: use redis://host:port/db") from None

    def save(self, blob: bytes) -> None:
        try:
            self.client.set(self.key, blob, ex=self.ttl)
        except redis.RedisError as exc:
            raise SnapshotError(f"redis {self.url}: {exc}") from None

    def load(self) -> bytes | None:
        try:
            return self.client.get(self.key)
        except redis.RedisError as exc:
            raise SnapshotError(f"redis {self.url}: {exc}") from None

    def describe(self) -> str:
        return f"redis {self.url} key {self.key}"


def redis_key(config: RelayConfig) -> str:
    return f"voicerelay:{config.cluster_id}:relay:{config.listen_port}:flows"


def open_store(config: RelayConfig) -> FileStore | RedisStore:
    """Redis when `--redis` is given, else the local file (embedded default)."""
    if config.redis_url:
        ttl = max(60, int(config.idle_timeout * 4), int(config.snapshot_interval * 10))
        return RedisStore(config.redis_url, redis_key(config), ttl=ttl)
    limit = BYTES_PER_FLOW * config.workers * config.capacity + 4096
    return FileStore(config.snapshot_file, max_bytes=limit)


# Restore and snapshotter ---------------------------------------------------------------------


def freshest(records: Iterable[FlowRecord]) -> list[FlowRecord]:
    """One record per client, the most recently seen: after a worker adopts a flow, its old
    copy stays in the previous worker's shard until that worker's sweep removes it."""
    latest: dict[Addr, FlowRecord] = {}
    for r in records:
        seen = latest.get(r.client)
        if seen is None or r.last_seen > seen.last_seen:
            latest[r.client] = r
    return list(latest.values())


def shard_of(client: Addr, shards: int) -> int:
    """The shard a restored flow goes to (any worker adopts it on its first packet)."""
    return zlib.crc32(client_key(client)) % shards


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did: flows put back, or why the snapshot was refused (one line)."""

    source: str
    restored: int = 0
    refused: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"restored": self.restored, "refused": self.refused, "source": self.source}


def restore(
    table: FlowTable,
    store: Store,
    now: float,
    seal: SnapshotSeal,
    *,
    networks: Sequence[IpNetwork] = DEFAULT_NETWORKS,
    idle_timeout: float | None = None,
) -> RestoreResult:
    """Load the last snapshot into an empty table, or refuse it whole with one log line."""
    source = store.describe()
    if table.count():
        return RestoreResult(source)
    try:
        blob = store.load()
        if blob is None:
            return RestoreResult(source)
        flows = decode_snapshot(blob, now, seal, networks=networks, idle_timeout=idle_timeout)
    except SnapshotError as exc:
        log.error("snapshot from %s refused, starting empty: %s", source, exc)
        return RestoreResult(source, refused=str(exc))
    return RestoreResult(source, restored=_put_all(table, freshest(flows)))


def _put_all(table: FlowTable, records: list[FlowRecord]) -> int:
    writers = [table.shard(i) for i in range(table.shards)]
    restored = 0
    for r in records:
        try:
            writers[shard_of(r.client, table.shards)].put(
                r.client, r.transceiver, r.last_seen, r.packets_in, r.packets_out
            )
            restored += 1
        except TableFull:
            log.warning("table full while restoring; %d flows dropped", len(records) - restored)
            break
    return restored


class Snapshotter:
    """Snapshots a flow table every `interval` seconds in a daemon thread, with backoff."""

    def __init__(
        self,
        table: FlowTable,
        store: Store,
        seal: SnapshotSeal,
        interval: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        self.table = table
        self.store = store
        self.seal = seal
        self.interval = interval
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "backend": getattr(store, "backend", type(store).__name__),
            "target": store.describe(),
            "last_ok": None,
            "last_error": None,
            "failures": 0,
            "consecutive_failures": 0,
            "snapshots": 0,
            "flows_in_last_snapshot": 0,
            "last_duration_ms": None,
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapshotter", daemon=True)
        self._thread.start()

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if final:
            self.snapshot_once()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def snapshot_once(self) -> bool:
        """Take and store one snapshot; True on success. Never raises."""
        started = time.perf_counter()
        try:
            records = freshest(self.table.records())
            self.store.save(encode_snapshot(records, self.clock(), self.seal))
        except Exception as exc:  # SnapshotError, or anything a store library throws
            with self._lock:
                first = self._state["consecutive_failures"] == 0
                self._state["failures"] += 1
                self._state["consecutive_failures"] += 1
                self._state["last_error"] = str(exc)
            if first:
                log.warning(
                    "snapshot to %s failed (will retry with backoff): %s",
                    self.store.describe(),
                    exc,
                )
            return False
        with self._lock:
            if self._state["consecutive_failures"]:
                log.info("snapshots to %s resumed", self.store.describe())
            self._state.update(
                last_ok=time.time(),
                consecutive_failures=0,
                flows_in_last_snapshot=len(records),
                last_duration_ms=(time.perf_counter() - started) * 1000,
            )
            self._state["snapshots"] += 1
        return True

    def _run(self) -> None:
        delay = self.interval
        while not self._stop.wait(delay):
            if self.snapshot_once():
                delay = self.interval
            else:
                with contextlib.suppress(Exception):
                    delay = min(MAX_BACKOFF, max(self.interval, delay * 2))
