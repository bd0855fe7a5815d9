"""What the kernel fast path's tests share: whether this machine can run it, the relay options
for either forwarding mode, and sockets made inside another network namespace."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

import pytest

CLONE_NEWNET = 0x40000000
MODES = ("userspace", "kernel")  # how a relay forwards established flows
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why this machine cannot load eBPF programs (one line), or None when it can."""
    if os.geteuid() != 0:
        return "loading eBPF programs needs root"
    return None


def relay_args(mode: str) -> list[str]:
    """The `relayctl start` options for a forwarding mode of `MODES`."""
    return ["--kernel-fast-path"] if mode == "kernel" else []


def require_mode(mode: str) -> None:
    """Skip a kernel-mode test on a machine that cannot load eBPF programs (not root)."""
    why = unavailable() if mode == "kernel" else None
    if why:
        pytest.skip(why)


def assert_mode(relay, mode: str) -> None:
    """The relay forwards as asked: a kernel-mode relay whose fast path did not come up fails
    the test (it would otherwise test userspace twice)."""
    state = relay.status()["fast_path"]
    if mode == "kernel":
        assert state.startswith("on"), f"kernel fast path did not come up: {state}"
    else:
        assert state == "off"


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run this thread inside network namespace `namespace` (sockets made here stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def udp_socket(host: str, port: int = 0, namespace: str | None = None) -> socket.socket:
    """A bound UDP socket (inside `namespace` if given), 2 s timeout."""
    ctx = inside(namespace) if namespace else contextlib.nullcontext()
    with ctx:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(2.0)
    return sock
