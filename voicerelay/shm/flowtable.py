"""The relay's flow table in shared memory: client address -> transceiver address.

Layout: a 64-byte header, then `shards * capacity` slots of 64 bytes. Each relay worker is the
only writer of its shard (open addressing, linear probing, tombstones). Readers in any process
use the per-slot sequence counter (a seqlock): the writer makes it odd, writes, makes it even;
a reader copies the slot between two equal even reads, else retries. No locks anywhere.

Slot: seq u32 | state u8 | client family u8, port u16, ip16 | transceiver family u8, pad,
port u16, ip16 | last_seen f64 (monotonic) | packets in u32 | packets out u32 | pad 4.

`last_seen` is the flow's last sign of life as the relay counts it: when its transceiver last
sent to the client (or, for a flow that never carried return traffic, when it was created or
adopted); see `relay/router.py`. The header keeps a one-byte generation after the table fields:
every relay worker bumps it when it starts, so the others know clients may have moved.

After the flow slots, `shards * capacity` token marks of 16 bytes: tag u64 (a hash of a routing
token, never 0) | last answered f64 (monotonic). A worker marks a token whose flow carried
return traffic, in its own shard's marks (open addressing, `MARK_PROBES` slots per tag, the
oldest overwritten); any worker reads them to know a token is in use elsewhere (a client that
moved to another address and worker mid-call). A mark is a hint: a torn read costs one wrong
answer, never a wrong route.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

from voicerelay.shm import segment
from voicerelay.wire.addr import Addr, pack_ip, unpack_ip

MAGIC = b"VRFT"
LAYOUT_VERSION = 2  # 2: token marks after the slots
HEADER_SIZE = 64
SLOT_SIZE = 64
MARK_SIZE = 16
MARK_PROBES = 8
_MARK = struct.Struct("<8sd")
_MARK_TIME = struct.Struct("<d")
_NO_TAG = bytes(8)
_TABLE_HEADER = struct.Struct("<IId")  # shards, capacity, created; after the owner block
GENERATION_AT = segment.OWNER_SIZE + _TABLE_HEADER.size  # one byte, bumped by starting workers

EMPTY, USED, TOMBSTONE = 0, 1, 2
_SEQ = struct.Struct("<I")
_BODY = struct.Struct("<BBH16sBxH16sdII")  # from offset 4
_COUNTERS = struct.Struct("<dII")  # from offset 44
_STATE_AT, _KEY_AT, _KEY_END, _COUNTERS_AT = 4, 5, 24, 44
_KEY = struct.Struct("<BH16s")
_RETRIES = 64


class TableFull(Exception):
    """The shard has no free slot for a new flow."""


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One flow as stored: who the client is, which transceiver serves it, and activity."""

    client: Addr
    transceiver: Addr
    last_seen: float
    packets_in: int = 0
    packets_out: int = 0


def client_key(client: Addr) -> bytes:
    """The 19 bytes a slot is keyed by (family, port, IP)."""
    family, ip16 = pack_ip(client[0])
    return _KEY.pack(family, client[1], ip16)


def _key_hash(key: bytes) -> int:
    return zlib.crc32(key)


def _decode(raw: bytes) -> FlowRecord:
    _, cfam, cport, cip, tfam, tport, tip, last, pin, pout = _BODY.unpack_from(raw, 4)
    return FlowRecord((unpack_ip(cfam, cip), cport), (unpack_ip(tfam, tip), tport), last, pin, pout)


class FlowTable:
    """A view of the flow table segment; `create` owns it, `attach` only uses it."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.buf = shm.buf
        self.name = shm.name
        self.owner = owner
        self.shards, self.capacity, self.created = _TABLE_HEADER.unpack_from(
            self.buf, segment.OWNER_SIZE
        )

    @classmethod
    def size_for(cls, shards: int, capacity: int) -> int:
        return HEADER_SIZE + shards * capacity * (SLOT_SIZE + MARK_SIZE)

    @classmethod
    def create(cls, name: str, shards: int, capacity: int, now: float = 0.0) -> FlowTable:
        """Create the segment (FileExistsError if present); this process becomes its owner."""
        shm = segment.create_segment(name, cls.size_for(shards, capacity), MAGIC, LAYOUT_VERSION)
        _TABLE_HEADER.pack_into(shm.buf, segment.OWNER_SIZE, shards, capacity, now)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> FlowTable:
        return cls(segment.attach_segment(name, MAGIC, LAYOUT_VERSION), owner=False)

    @staticmethod
    def clear_stale(name: str) -> bool:
        """Unlink a table left behind by a launcher that died; True if one was removed."""
        return segment.clear_stale(name)

    def slot_offset(self, shard: int, index: int) -> int:
        return HEADER_SIZE + (shard * self.capacity + index) * SLOT_SIZE

    def mark_offset(self, shard: int, index: int) -> int:
        marks = HEADER_SIZE + self.shards * self.capacity * SLOT_SIZE
        return marks + (shard * self.capacity + index) * MARK_SIZE

    def token_marked(self, tag: bytes) -> float | None:
        """The latest time any worker marked token `tag` (8 bytes, not all zero), or None."""
        latest: float | None = None
        buf = self.buf
        start = int.from_bytes(tag, "little") % self.capacity
        for shard in range(self.shards):
            for step in range(MARK_PROBES):
                off = self.mark_offset(shard, (start + step) % self.capacity)
                stored, when = _MARK.unpack_from(buf, off)
                if stored == tag:
                    latest = when if latest is None else max(latest, when)
                    break
                if stored == _NO_TAG:
                    break
        return latest

    @property
    def generation(self) -> int:
        """The worker generation (0-255, wrapping): it changes whenever a worker starts."""
        return self.buf[GENERATION_AT]

    def bump_generation(self) -> int:
        """Announce a starting worker (clients may move between workers); the new value.

        Several writers may race here; a lost increment still leaves the value changed."""
        value = (self.buf[GENERATION_AT] + 1) & 0xFF
        self.buf[GENERATION_AT] = value
        return value

    def shard(self, index: int) -> ShardWriter:
        """The writer of shard `index`: only its owning worker may use it."""
        if not 0 <= index < self.shards:
            raise IndexError(f"shard {index} of {self.shards}")
        return ShardWriter(self, index)

    # Lock-free reads ------------------------------------------------------------------------
    def read_slot(self, offset: int) -> bytes | None:
        """A consistent copy of the slot at `offset`, or None if it kept changing."""
        buf = self.buf
        for _ in range(_RETRIES):
            (s1,) = _SEQ.unpack_from(buf, offset)
            if s1 & 1:
                continue
            raw = bytes(buf[offset : offset + SLOT_SIZE])
            (s2,) = _SEQ.unpack_from(buf, offset)
            if s1 == s2:
                return raw
        return None

    def _probe(self, shard: int, key: bytes) -> FlowRecord | None:
        cap = self.capacity
        start = _key_hash(key) % cap
        base = self.slot_offset(shard, 0)
        for step in range(cap):
            raw = self.read_slot(base + ((start + step) % cap) * SLOT_SIZE)
            if raw is None:
                continue
            state = raw[_STATE_AT]
            if state == EMPTY:
                return None
            if state == USED and raw[_KEY_AT:_KEY_END] == key:
                return _decode(raw)
        return None

    def lookup_in(self, shard: int, client: Addr) -> FlowRecord | None:
        return self._probe(shard, client_key(client))

    def lookup(self, client: Addr, skip: int | None = None) -> tuple[int, FlowRecord] | None:
        """Find a client's flow in any shard (except `skip`)."""
        key = client_key(client)
        for shard in range(self.shards):
            if shard != skip:
                record = self._probe(shard, key)
                if record is not None:
                    return shard, record
        return None

    def records(self, shard: int | None = None) -> Iterator[FlowRecord]:
        """Every live flow (of one shard, or all), each read consistently."""
        shards = range(self.shards) if shard is None else (shard,)
        buf = self.buf
        for s in shards:
            base = self.slot_offset(s, 0)
            for i in range(self.capacity):
                offset = base + i * SLOT_SIZE
                if buf[offset + _STATE_AT] != USED:
                    continue
                raw = self.read_slot(offset)
                if raw is not None and raw[_STATE_AT] == USED:
                    yield _decode(raw)

    def count(self, shard: int | None = None) -> int:
        shards = range(self.shards) if shard is None else (shard,)
        buf = self.buf
        total = 0
        for s in shards:
            base = self.slot_offset(s, 0)
            total += bytes(  # one strided copy of the state bytes
                buf[base + _STATE_AT : base + self.capacity * SLOT_SIZE : SLOT_SIZE]
            ).count(USED)
        return total

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        self._shm.close()

    def unlink(self) -> None:
        segment.unlink(self._shm)


class ShardWriter:
    """The single writer of one shard. It finds flows by probing its shard in shared memory
    (no in-process index: attaching to a full shard costs one strided count, not a scan)."""

    def __init__(self, table: FlowTable, shard: int) -> None:
        self.table = table
        self.shard_index = shard
        self.capacity = table.capacity
        self._base = table.slot_offset(shard, 0)
        self._cursor = 0
        self.used = table.count(shard)  # live flows in the shard, whoever created them

    def __len__(self) -> int:
        return self.used

    def _states(self, first: int, count: int) -> bytes:
        """The state bytes of slots first..first+count-1 (one strided copy, no Python loop)."""
        start = self._base + first * SLOT_SIZE + _STATE_AT
        return bytes(self.table.buf[start : start + count * SLOT_SIZE : SLOT_SIZE])

    def _find(self, key: bytes) -> tuple[int, int]:
        """(slot holding `key` or -1, first reusable slot on its probe path or -1)."""
        cap = self.capacity
        buf = self.table.buf
        base = self._base
        slot = _key_hash(key) % cap
        reusable = -1
        for _ in range(cap):
            off = base + slot * SLOT_SIZE
            state = buf[off + _STATE_AT]
            if state == EMPTY:
                return -1, slot if reusable < 0 else reusable
            if state == USED:
                if buf[off + _KEY_AT : off + _KEY_END] == key:
                    return slot, reusable
            elif reusable < 0:
                reusable = slot
            slot = (slot + 1) % cap
        return -1, reusable

    def _write(
        self,
        slot: int,
        state: int,
        client: Addr,
        transceiver: Addr,
        last: float,
        pin: int,
        pout: int,
    ) -> None:
        buf = self.table.buf
        off = self._base + slot * SLOT_SIZE
        (seq,) = _SEQ.unpack_from(buf, off)
        _SEQ.pack_into(buf, off, (seq + 1) & 0xFFFFFFFF)
        cfam, cip = pack_ip(client[0])
        tfam, tip = pack_ip(transceiver[0])
        _BODY.pack_into(
            buf,
            off + 4,
            state,
            cfam,
            client[1],
            cip,
            tfam,
            transceiver[1],
            tip,
            last,
            pin & 0xFFFFFFFF,
            pout & 0xFFFFFFFF,
        )
        _SEQ.pack_into(buf, off, (seq + 2) & 0xFFFFFFFF)

    def _set_state(self, slot: int, state: int) -> None:
        buf = self.table.buf
        off = self._base + slot * SLOT_SIZE
        (seq,) = _SEQ.unpack_from(buf, off)
        _SEQ.pack_into(buf, off, (seq + 1) & 0xFFFFFFFF)
        buf[off + _STATE_AT] = state
        _SEQ.pack_into(buf, off, (seq + 2) & 0xFFFFFFFF)

    def put(
        self, client: Addr, transceiver: Addr, now: float, packets_in: int = 0, packets_out: int = 0
    ) -> int:
        """Insert or rebind a flow; returns its slot. Raises `TableFull`."""
        slot, free = self._find(client_key(client))
        if slot < 0:
            if free < 0:
                raise TableFull(f"shard {self.shard_index} holds {self.capacity} flows")
            slot = free
            self.used += 1
        self._write(slot, USED, client, transceiver, now, packets_in, packets_out)
        return slot

    def touch(self, slot: int, last_seen: float, packets_in: int, packets_out: int) -> None:
        """Flush activity of a flow (called on a timer, never per packet)."""
        buf = self.table.buf
        off = self._base + slot * SLOT_SIZE
        (seq,) = _SEQ.unpack_from(buf, off)
        _SEQ.pack_into(buf, off, (seq + 1) & 0xFFFFFFFF)
        _COUNTERS.pack_into(
            buf, off + _COUNTERS_AT, last_seen, packets_in & 0xFFFFFFFF, packets_out & 0xFFFFFFFF
        )
        _SEQ.pack_into(buf, off, (seq + 2) & 0xFFFFFFFF)

    def get(self, client: Addr) -> tuple[int, FlowRecord] | None:
        slot, _ = self._find(client_key(client))
        if slot < 0:
            return None
        off = self._base + slot * SLOT_SIZE
        return slot, _decode(bytes(self.table.buf[off : off + SLOT_SIZE]))

    def remove(self, client: Addr) -> bool:
        slot, _ = self._find(client_key(client))
        if slot < 0:
            return False
        self._release(slot)
        return True

    def mark_token(self, tag: bytes, when: float) -> None:
        """Record that token `tag` (8 bytes, not all zero) was answered at `when`: in its own
        mark, a free one on its probe path, or over the oldest there."""
        table = self.table
        buf = table.buf
        start = int.from_bytes(tag, "little") % self.capacity
        oldest, oldest_when = -1, float("inf")
        for step in range(MARK_PROBES):
            off = table.mark_offset(self.shard_index, (start + step) % self.capacity)
            stored, stored_when = _MARK.unpack_from(buf, off)
            if stored == tag:
                _MARK_TIME.pack_into(buf, off + 8, when)
                return
            if stored == _NO_TAG:
                oldest = off
                break
            if stored_when < oldest_when:
                oldest, oldest_when = off, stored_when
        buf[oldest : oldest + 8] = _NO_TAG  # a reader never sees the new tag with an old time
        _MARK_TIME.pack_into(buf, oldest + 8, when)
        buf[oldest : oldest + 8] = tag

    def evict(self, client: Addr) -> bool:
        """Remove a flow that never carried return traffic (packets out 0, as last flushed) to
        make room for another; True if removed. A flow that carried some stays."""
        slot, _ = self._find(client_key(client))
        if slot < 0:
            return False
        _, _, packets_out = _COUNTERS.unpack_from(
            self.table.buf, self._base + slot * SLOT_SIZE + _COUNTERS_AT
        )
        if packets_out:
            return False
        self._release(slot)
        return True

    def _release(self, slot: int) -> None:
        """Tombstone a slot; turn it (and tombstones before it) EMPTY when it ends a run."""
        self.used -= 1
        cap = self.capacity
        buf = self.table.buf
        after = self._base + ((slot + 1) % cap) * SLOT_SIZE + _STATE_AT
        if buf[after] != EMPTY:
            self._set_state(slot, TOMBSTONE)
            return
        for _ in range(cap):
            self._set_state(slot, EMPTY)
            slot = (slot - 1) % cap
            if buf[self._base + slot * SLOT_SIZE + _STATE_AT] != TOMBSTONE:
                break

    def expire(
        self,
        now: float,
        idle: float,
        max_slots: int | None = None,
        moved_after: float | None = None,
        unanswered_after: float | None = None,
    ) -> list[Addr]:
        """Remove flows idle longer than `idle`. Scans at most `max_slots` slots per call,
        resuming where the previous call stopped, so a sweep costs the same at any size; only
        live slots cost Python time (free ones are skipped in one strided copy).

        With `moved_after`, a flow silent here that long is also removed when another shard
        holds a fresher copy: its client moved to another worker, which adopted it. With
        `unanswered_after`, a flow that never carried return traffic (packets out 0) goes
        after that long."""
        cap = self.capacity
        budget = cap if max_slots is None else min(max_slots, cap)
        buf = self.table.buf
        removed: list[Addr] = []
        first = self._cursor
        head = min(budget, cap - first)  # the scan may wrap around the end of the shard
        for begin, count in ((first, head), (0, budget - head)):
            states = self._states(begin, count)
            i = states.find(USED)
            while i >= 0:
                slot = begin + i
                off = self._base + slot * SLOT_SIZE
                last, _, packets_out = _COUNTERS.unpack_from(buf, off + _COUNTERS_AT)
                silent = now - last
                if (
                    silent > idle
                    or (
                        unanswered_after is not None
                        and not packets_out
                        and silent > unanswered_after
                    )
                    or (moved_after is not None and silent > moved_after and self._moved(off, last))
                ):
                    removed.append(_decode(bytes(buf[off : off + SLOT_SIZE])).client)
                    self._release(slot)
                i = states.find(USED, i + 1)
        self._cursor = (first + budget) % cap
        return removed

    def _moved(self, offset: int, last_seen: float) -> bool:
        """Does another shard hold a fresher copy of the flow at `offset`?"""
        client = _decode(bytes(self.table.buf[offset : offset + SLOT_SIZE])).client
        hit = self.table.lookup(client, skip=self.shard_index)
        return hit is not None and hit[1].last_seen > last_seen
