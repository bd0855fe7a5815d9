"""The relay's flow table in shared memory: client address -> transceiver address.

Layout: a 64-byte header, then `shards * capacity` slots of 64 bytes. Each relay worker is the
only writer of its shard (open addressing, linear probing, tombstones). Readers in any process
use the per-slot sequence counter (a seqlock): the writer makes it odd, writes, makes it even;
a reader copies the slot between two equal even reads, else retries. No locks anywhere.

Slot: seq u32 | state u8 | client family u8, port u16, ip16 | transceiver family u8, pad,
port u16, ip16 | last_seen f64 (monotonic) | packets in u32 | packets out u32 | pad 4.
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
LAYOUT_VERSION = 1
HEADER_SIZE = 64
SLOT_SIZE = 64
_TABLE_HEADER = struct.Struct("<IId")  # shards, capacity, created; after the owner block

EMPTY, USED, TOMBSTONE = 0, 1, 2
_SEQ = struct.Struct("<I")
_BODY = struct.Struct("<BBH16sBxH16sdII")  # from offset 4
_COUNTERS = struct.Struct("<dII")  # from offset 44
_LAST_SEEN = struct.Struct("<d")
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
        return HEADER_SIZE + shards * capacity * SLOT_SIZE

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
        self._used = table.count(shard)

    def __len__(self) -> int:
        return self._used

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
            self._used += 1
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

    def _release(self, slot: int) -> None:
        """Tombstone a slot; turn it (and tombstones before it) EMPTY when it ends a run."""
        self._used -= 1
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
    ) -> list[Addr]:
        """Remove flows idle longer than `idle`. Scans at most `max_slots` slots per call,
        resuming where the previous call stopped, so a sweep costs the same at any size; only
        live slots cost Python time (free ones are skipped in one strided copy).

        With `moved_after`, a flow silent here that long is also removed when another shard
        holds a fresher copy: its client moved to another worker, which adopted it."""
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
                (last,) = _LAST_SEEN.unpack_from(buf, off + _COUNTERS_AT)
                silent = now - last
                if silent > idle or (
                    moved_after is not None and silent > moved_after and self._moved(off, last)
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
