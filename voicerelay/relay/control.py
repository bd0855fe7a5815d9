"""The launcher's control socket: length-prefixed msgpack maps over a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from typing import Any

import msgpack

from voicerelay.relay.config import RelayConfig

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 1 << 20


class ControlError(RuntimeError):
    """The launcher could not be reached or answered nonsense."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_MESSAGE:
        raise ControlError("message too large")
    return msgpack.unpackb(await reader.readexactly(length))


async def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = msgpack.packb(message)
    writer.write(_LENGTH.pack(len(body)) + body)
    await writer.drain()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ControlError("launcher closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def request(config: RelayConfig, op: str, timeout: float = 3.0) -> dict[str, Any]:
    """Send one request to the launcher of `config`'s port and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(config.control_socket))
            body = msgpack.packb({"op": op})
            sock.sendall(_LENGTH.pack(len(body)) + body)
            (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
            if length > MAX_MESSAGE:
                raise ControlError("reply too large")
            return msgpack.unpackb(_recv_exactly(sock, length))
    except (OSError, ValueError) as exc:
        raise ControlError(f"no relay answers on {config.control_socket} ({exc})") from None


def is_running(config: RelayConfig) -> bool:
    """True if a launcher answers on this port's control socket."""
    if not config.control_socket.exists():
        return False
    try:
        return bool(request(config, "status", timeout=1.0).get("ok"))
    except ControlError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(Exception), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"
    return True


def stop(config: RelayConfig, timeout: float = 10.0) -> bool:
    """Ask the launcher to stop and wait until its process is gone. False if none ran."""
    try:
        reply = request(config, "stop")
    except ControlError:
        return False
    pid = int(reply.get("pid", 0))
    deadline = time.monotonic() + timeout
    while pid and _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid and _pid_alive(pid):
        raise ControlError(f"relay (pid {pid}) did not stop within {timeout:.0f} s")
    return True
