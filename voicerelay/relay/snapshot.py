"""Flow-table snapshots for restart recovery: a msgpack codec, two stores, a snapshotter thread.

Format (msgpack map, see docs/SNAPSHOTS.md): `{"format": "voicerelay-flows", "v": 1,
"wall": <unix time taken>, "flows": [[client host, client port, transceiver host,
transceiver port, idle age s, packets in, packets out], ...]}`. Monotonic clocks do not survive
a reboot, so each flow carries its idle age; restore adds the downtime and drops flows that went
idle past the timeout meanwhile. Unknown formats or versions are refused whole, never half-loaded.

Stores: `FileStore` (the embedded default, atomic replace) and `RedisStore` (one key with an
expiry). The `Snapshotter` runs in its own thread: a slow or dead Redis delays only snapshots,
never the launcher's event loop, and never forwarding (which lives in the worker processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import msgpack
import redis

from voicerelay.relay.config import RelayConfig
from voicerelay.shm.flowtable import FlowRecord, FlowTable, TableFull, client_key

log = logging.getLogger("voicerelay.snapshot")

FORMAT = "voicerelay-flows"
VERSION = 1
MAX_BACKOFF = 5.0


class SnapshotError(ValueError):
    """A snapshot cannot be used (corrupt, truncated, unknown version) or stored."""


# Codec ---------------------------------------------------------------------------------------


def encode_snapshot(records: Iterable[FlowRecord], now: float, wall: float | None = None) -> bytes:
    """Serialize flows; `now` is the monotonic clock their last_seen values refer to."""
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
    return msgpack.packb(
        {
            "format": FORMAT,
            "v": VERSION,
            "wall": time.time() if wall is None else wall,
            "flows": flows,
        }
    )


def _valid_addr(host: Any, port: Any) -> bool:
    return isinstance(host, str) and isinstance(port, int) and 0 <= port <= 65535


def decode_snapshot(
    blob: bytes, now: float, *, wall_now: float | None = None, idle_timeout: float | None = None
) -> list[FlowRecord]:
    """Flows of a snapshot with last_seen on `now`'s clock; raises only `SnapshotError`."""
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
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
    records = []
    for i, flow in enumerate(flows):
        if not (
            isinstance(flow, list)
            and len(flow) == 7
            and _valid_addr(flow[0], flow[1])
            and _valid_addr(flow[2], flow[3])
            and isinstance(flow[4], int | float)
            and flow[4] >= 0
            and isinstance(flow[5], int)
            and isinstance(flow[6], int)
        ):
            raise SnapshotError(f"flow {i} is damaged")
        age = flow[4] + downtime
        if idle_timeout is not None and age > idle_timeout:
            continue
        try:
            client_key((flow[0], flow[1]))
            client_key((flow[2], flow[3]))
        except ValueError:
            raise SnapshotError(f"flow {i} has a bad address") from None
        records.append(
            FlowRecord(
                (flow[0], flow[1]),
                (flow[2], flow[3]),
                now - age,
                flow[5] & 0xFFFFFFFF,
                flow[6] & 0xFFFFFFFF,
            )
        )
    return records


# Stores --------------------------------------------------------------------------------------


class Store(Protocol):
    def save(self, blob: bytes) -> None: ...
    def load(self) -> bytes | None: ...
    def describe(self) -> str: ...


class FileStore:
    """A snapshot file under the state directory, replaced atomically."""

    backend = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, blob: bytes) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise SnapshotError(f"cannot write {self.path}: {exc.strerror}") from None

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"cannot read {self.path}: {exc.strerror}") from None

    def describe(self) -> str:
        return f"file {self.path}"


class RedisStore:
    """One Redis key per relay (`voicerelay:{cluster}:relay:{port}:flows`) with an expiry."""

    backend = "redis"

    def __init__(self, url: str, key: str, ttl: int = 120, timeout: float = 0.5) -> None:
        self.url = url
        self.key = key
        self.ttl = ttl
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False
        )

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
    return FileStore(config.snapshot_file)


# Restore and snapshotter ---------------------------------------------------------------------


def freshest(records: Iterable[FlowRecord]) -> list[FlowRecord]:
    """One record per client, the most recently seen: after a worker adopts a flow, its old
    copy stays in the previous worker's shard until that worker's sweep removes it."""
    latest: dict[tuple[str, int], FlowRecord] = {}
    for r in records:
        seen = latest.get(r.client)
        if seen is None or r.last_seen > seen.last_seen:
            latest[r.client] = r
    return list(latest.values())


def shard_of(client: tuple[str, int], shards: int) -> int:
    """The shard a restored flow goes to (any worker adopts it on its first packet)."""
    return zlib.crc32(client_key(client)) % shards


def restore(
    table: FlowTable, store: Store, now: float, *, idle_timeout: float | None = None
) -> int:
    """Load the last snapshot into an empty table; returns flows restored (0 on any error)."""
    if table.count():
        return 0
    try:
        blob = store.load()
        if blob is None:
            return 0
        records = freshest(decode_snapshot(blob, now, idle_timeout=idle_timeout))
    except SnapshotError as exc:
        log.error("snapshot from %s refused, starting empty: %s", store.describe(), exc)
        return 0
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
        self, table: FlowTable, store: Store, interval: float = 1.0, clock=time.monotonic
    ) -> None:
        self.table = table
        self.store = store
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
            self.store.save(encode_snapshot(records, self.clock()))
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
