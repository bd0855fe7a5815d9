"""Named shared-memory segments with an owner pid, outside multiprocessing's resource tracker.

The launcher owns a segment and unlinks it on a clean stop; workers attach. A launcher that was
killed leaves its segment behind: `clear_stale` finds it by the dead owner pid and unlinks it.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import os
import struct
from multiprocessing import resource_tracker, shared_memory

import psutil

# magic (4) | layout version (4) | owner pid (4) | reserved (4)
OWNER = struct.Struct("<4sII4x")
OWNER_SIZE = OWNER.size


def _untracked(shm: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    # Python 3.11 registers every SharedMemory with the resource tracker, which unlinks it when
    # any attaching process exits. Lifetime is ours to manage.
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def create_segment(name: str, size: int, magic: bytes, version: int) -> shared_memory.SharedMemory:
    """Create a zeroed segment stamped with magic, version and this process as owner."""
    shm = _untracked(shared_memory.SharedMemory(name=name, create=True, size=size))
    OWNER.pack_into(shm.buf, 0, magic, version, os.getpid())
    return shm


def attach_segment(name: str, magic: bytes, version: int) -> shared_memory.SharedMemory:
    """Attach to an existing segment; raises FileNotFoundError or ValueError on a mismatch."""
    shm = _untracked(shared_memory.SharedMemory(name=name, create=False))
    found_magic, found_version, _ = OWNER.unpack_from(shm.buf, 0)
    if found_magic != magic or found_version != version:
        shm.close()
        raise ValueError(
            f"shared memory {name!r} has another layout ({found_magic!r} v{found_version})"
        )
    return shm


def owner_pid(shm: shared_memory.SharedMemory) -> int:
    return OWNER.unpack_from(shm.buf, 0)[2]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def clear_stale(name: str) -> bool:
    """Unlink segment `name` if its owner process is gone; True if it was removed."""
    try:
        shm = _untracked(shared_memory.SharedMemory(name=name, create=False))
    except FileNotFoundError:
        return False
    try:
        pid = owner_pid(shm) if shm.size >= OWNER_SIZE else 0
        if pid and pid != os.getpid() and _alive(pid):
            return False
        unlink(shm)
        return True
    finally:
        shm.close()


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def unlink(shm: shared_memory.SharedMemory) -> None:
    """Remove the segment's name (without telling the resource tracker, which never knew)."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]
