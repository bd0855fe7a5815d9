"""Per-worker statistics in shared memory: one row of named u64 counters per worker.

Each row has one writer (its worker, which publishes on a timer, never per packet) and a
sequence counter, so `relayctl stats` reads every row consistently without locks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from multiprocessing import shared_memory

from voicerelay.shm import segment

MAGIC = b"VRCT"
LAYOUT_VERSION = 1
_META = struct.Struct("<II")  # rows, fields; then the field names, NUL separated
_NAMES_SIZE = 4096
_HEADER_SIZE = segment.OWNER_SIZE + _META.size + _NAMES_SIZE
_RETRIES = 64


class CounterArray:
    """Rows of named unsigned 64-bit counters in a shared-memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.buf = shm.buf
        self.owner = owner
        self.rows, nfields = _META.unpack_from(self.buf, segment.OWNER_SIZE)
        names = bytes(self.buf[segment.OWNER_SIZE + _META.size : _HEADER_SIZE]).rstrip(b"\0")
        self.fields: list[str] = names.decode().split("\0") if nfields else []
        self._row = struct.Struct(f"<{len(self.fields) + 1}Q")  # seq, then values

    @classmethod
    def create(cls, name: str, rows: int, fields: Sequence[str]) -> CounterArray:
        names = "\0".join(fields).encode()
        if len(names) >= _NAMES_SIZE:
            raise ValueError("too many counter names")
        row_size = 8 * (len(fields) + 1)
        shm = segment.create_segment(name, _HEADER_SIZE + rows * row_size, MAGIC, LAYOUT_VERSION)
        _META.pack_into(shm.buf, segment.OWNER_SIZE, rows, len(fields))
        shm.buf[segment.OWNER_SIZE + _META.size : segment.OWNER_SIZE + _META.size + len(names)] = (
            names
        )
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> CounterArray:
        return cls(segment.attach_segment(name, MAGIC, LAYOUT_VERSION), owner=False)

    @staticmethod
    def clear_stale(name: str) -> bool:
        return segment.clear_stale(name)

    def _offset(self, row: int) -> int:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of {self.rows}")
        return _HEADER_SIZE + row * self._row.size

    def publish(self, row: int, values: Mapping[str, int]) -> None:
        """Write a whole row (unknown names are ignored, missing ones become 0)."""
        off = self._offset(row)
        seq = struct.unpack_from("<Q", self.buf, off)[0]
        struct.pack_into("<Q", self.buf, off, seq + 1)
        vals = [int(values.get(f, 0)) & 0xFFFFFFFFFFFFFFFF for f in self.fields]
        struct.pack_into(f"<{len(vals)}Q", self.buf, off + 8, *vals)
        struct.pack_into("<Q", self.buf, off, seq + 2)

    def read(self, row: int) -> dict[str, int]:
        """A consistent copy of one row (the last complete publish)."""
        off = self._offset(row)
        values: tuple[int, ...] = ()
        for _ in range(_RETRIES):
            values = self._row.unpack_from(self.buf, off)
            if values[0] & 1:
                continue
            if struct.unpack_from("<Q", self.buf, off)[0] == values[0]:
                break
        return dict(zip(self.fields, values[1:], strict=True))

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        self._shm.close()

    def unlink(self) -> None:
        segment.unlink(self._shm)
