"""The few libbpf (libbpf.so.1) calls the fast path uses, through ctypes.

Every call returns Python values or raises `BpfError` (an OSError carrying errno and naming the
call); libbpf's own printing is off. The library is loaded on first use, so importing this
module never fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_codes
import os
from functools import cache

BPF_ANY = 0
BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1


class BpfError(OSError):
    """A libbpf call failed (errno set)."""


class TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@cache
def lib() -> ctypes.CDLL:
    """libbpf, with printing off; BpfError(ENOENT) if it is not installed."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise BpfError(errno_codes.ENOENT, "libbpf.so.1 not found (apt install libbpf1)") from None
    c_void_p, c_int = ctypes.c_void_p, ctypes.c_int
    for fn, res, args in (
        ("bpf_object__open_file", c_void_p, [ctypes.c_char_p, c_void_p]),
        ("bpf_object__load", c_int, [c_void_p]),
        ("bpf_object__close", None, [c_void_p]),
        ("bpf_object__find_program_by_name", c_void_p, [c_void_p, ctypes.c_char_p]),
        ("bpf_program__fd", c_int, [c_void_p]),
        ("bpf_object__find_map_fd_by_name", c_int, [c_void_p, ctypes.c_char_p]),
        ("bpf_map_update_elem", c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", c_int, [c_int, c_void_p, c_void_p]),
        ("bpf_map_delete_elem", c_int, [c_int, c_void_p]),
        (
            "bpf_map_lookup_batch",
            c_int,
            [
                c_int,
                c_void_p,
                c_void_p,
                c_void_p,
                c_void_p,
                ctypes.POINTER(ctypes.c_uint32),
                c_void_p,
            ],
        ),
        ("bpf_tc_hook_create", c_int, [ctypes.POINTER(TcHook)]),
        ("bpf_tc_attach", c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        ("bpf_tc_detach", c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        ("bpf_tc_query", c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        ("libbpf_set_print", c_void_p, [c_void_p]),
        ("libbpf_num_possible_cpus", c_int, []),
    ):
        func = getattr(handle, fn)
        func.restype, func.argtypes = res, args
    handle.libbpf_set_print(None)
    return handle


def _check(rc: int, call: str) -> int:
    if rc < 0:
        code = -rc if rc != -1 else ctypes.get_errno()
        raise BpfError(code, f"{call}: {os.strerror(code)}")
    return rc


def open_and_load(path: str) -> int:
    """Open and load a BPF object file; its handle (a pointer, as an int)."""
    obj = lib().bpf_object__open_file(path.encode(), None)
    if not obj:
        code = ctypes.get_errno() or errno_codes.EINVAL
        raise BpfError(code, f"opening {path}: {os.strerror(code)}")
    rc = lib().bpf_object__load(obj)
    if rc < 0:
        lib().bpf_object__close(obj)
        _check(rc, "loading the program")
    return obj


def close(obj: int) -> None:
    lib().bpf_object__close(obj)


def program_fd(obj: int, name: str) -> int:
    prog = lib().bpf_object__find_program_by_name(obj, name.encode())
    if not prog:
        raise BpfError(errno_codes.ENOENT, f"no program {name!r} in the object")
    return _check(lib().bpf_program__fd(prog), f"program {name}")


def map_fd(obj: int, name: str) -> int:
    return _check(lib().bpf_object__find_map_fd_by_name(obj, name.encode()), f"map {name}")


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "counting CPUs")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, flags), "map update")


def map_lookup(fd: int, key: bytes, size: int) -> bytes | None:
    """The value under `key` (`size` bytes), or None when there is none."""
    out = ctypes.create_string_buffer(size)
    rc = lib().bpf_map_lookup_elem(fd, key, out)
    if rc < 0 and (-rc == errno_codes.ENOENT or ctypes.get_errno() == errno_codes.ENOENT):
        return None
    _check(rc, "map lookup")
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False if it was not there."""
    rc = lib().bpf_map_delete_elem(fd, key)
    if rc < 0 and (-rc == errno_codes.ENOENT or ctypes.get_errno() == errno_codes.ENOENT):
        return False
    _check(rc, "map delete")
    return True


def map_items(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, read in batches (a few system calls for the lot)."""
    items: list[tuple[bytes, bytes]] = []
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token_in = ctypes.create_string_buffer(max(8, key_size))
    token_out = ctypes.create_string_buffer(max(8, key_size))
    first = True
    while True:
        count = ctypes.c_uint32(chunk)
        rc = lib().bpf_map_lookup_batch(
            fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), None
        )
        done = rc < 0 and (-rc == errno_codes.ENOENT or ctypes.get_errno() == errno_codes.ENOENT)
        if rc < 0 and not done:
            _check(rc, "map batch lookup")
        kraw, vraw = keys.raw, values.raw
        for i in range(count.value):
            items.append(
                (
                    kraw[i * key_size : (i + 1) * key_size],
                    vraw[i * value_size : (i + 1) * value_size],
                )
            )
        if done:
            return items
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def tc_hook(ifindex: int) -> TcHook:
    return TcHook(ctypes.sizeof(TcHook), ifindex, BPF_TC_INGRESS, 0, 0)


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int) -> int:
    """Attach `prog_fd` on `ifindex`'s ingress (creating its clsact qdisc if needed) under
    (`handle`, `priority`), replacing what was there; the attached program's id."""
    hook = tc_hook(ifindex)
    rc = lib().bpf_tc_hook_create(ctypes.byref(hook))
    if rc < 0 and -rc != errno_codes.EEXIST:
        _check(rc, f"creating the clsact qdisc on interface {ifindex}")
    opts = TcOpts(ctypes.sizeof(TcOpts), prog_fd, BPF_TC_F_REPLACE, 0, handle, priority, 0)
    _check(lib().bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), "attaching to tc")
    return opts.prog_id


def tc_attached(ifindex: int, handle: int, priority: int) -> int | None:
    """The id of the program attached under (`handle`, `priority`), or None."""
    hook = tc_hook(ifindex)
    opts = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority, 0)
    rc = lib().bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if rc < 0:
        return None
    return opts.prog_id


def tc_detach(ifindex: int, handle: int, priority: int) -> None:
    hook = tc_hook(ifindex)
    opts = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority, 0)
    rc = lib().bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if rc < 0 and -rc not in (errno_codes.ENOENT, errno_codes.ENODEV):
        _check(rc, "detaching from tc")
