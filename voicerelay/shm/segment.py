"""Named shared-memory segments with an owner, outside multiprocessing's resource tracker.

The launcher owns a segment and unlinks it on a clean stop; workers attach. A launcher that was
killed leaves its segment behind: `clear_stale` finds it by its owner (pid and process start
time, so a recycled pid does not pass for the owner) and unlinks it.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory

import psutil

# magic (4) | layout version (4) | owner pid (4) | owner start time, whole seconds (4)
OWNER = struct.Struct("<4sIII")
OWNER_SIZE = OWNER.size
_construction = threading.Lock()


@contextlib.contextmanager
def _no_tracking() -> Iterator[None]:
    """Build SharedMemory objects without telling the resource tracker.

    Python 3.11 registers every SharedMemory, attached or created, with the resource tracker,
    which would unlink it when a worker exits; and workers attaching at once race register and
    unregister messages in their shared tracker. Lifetime is ours: no registration at all.
    """
    with _construction:
        register = resource_tracker.register
        resource_tracker.register = lambda name, rtype: None
        try:
            yield
        finally:
            resource_tracker.register = register


def _start_time(pid: int) -> int:
    try:
        return int(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0


def create_segment(name: str, size: int, magic: bytes, version: int) -> shared_memory.SharedMemory:
    """Create a zeroed segment stamped with magic, version and this process as owner."""
    with _no_tracking():
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    pid = os.getpid()
    OWNER.pack_into(shm.buf, 0, magic, version, pid, _start_time(pid))
    return shm


def attach_segment(name: str, magic: bytes, version: int) -> shared_memory.SharedMemory:
    """Attach to an existing segment; raises FileNotFoundError or ValueError on a mismatch."""
    with _no_tracking():
        shm = shared_memory.SharedMemory(name=name, create=False)
    found_magic, found_version, _, _ = OWNER.unpack_from(shm.buf, 0)
    if found_magic != magic or found_version != version:
        shm.close()
        raise ValueError(
            f"shared memory {name!r} has another layout ({found_magic!r} v{found_version})"
        )
    return shm


def owner_pid(shm: shared_memory.SharedMemory) -> int:
    return OWNER.unpack_from(shm.buf, 0)[2]


def owner_alive(pid: int, started: int) -> bool:
    """Is process `pid` running, and the very process that stamped the segment?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not started or abs(int(proc.create_time()) - started) <= 1
    except psutil.Error:
        return False


def live_owner(name: str) -> int | None:
    """The pid of the live process that owns segment `name`, or None."""
    try:
        with _no_tracking():
            shm = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        return None
    try:
        if shm.size < OWNER_SIZE:
            return None
        _, _, pid, started = OWNER.unpack_from(shm.buf, 0)
        return pid if pid and owner_alive(pid, started) else None
    finally:
        shm.close()


def clear_stale(name: str) -> bool:
    """Unlink segment `name` unless another live process owns it; True if it was removed."""
    if not exists(name):
        return False
    owner = live_owner(name)
    if owner is not None and owner != os.getpid():
        return False
    try:
        with _no_tracking():
            shm = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        return False
    try:
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
