"""The launcher's control socket, both ends: length-prefixed msgpack maps over a unix socket,
one request and one reply per connection.

The launcher serves it (`serve`, with a table of operations); `relayctl` asks (`request`,
`is_running`, `stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
from msgpack.exceptions import UnpackException

from voicerelay.relay.config import RelayConfig

log = logging.getLogger("voicerelay.launcher")  # the serving end runs in the launcher
_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 1 << 20
Operation = Callable[[], dict[str, Any]]


class ControlError(RuntimeError):
    """The launcher could not be reached or answered nonsense."""


def encode(message: dict[str, Any]) -> bytes:
    """One message, framed: its length, then the msgpack map."""
    body = msgpack.packb(message)
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """One message body; ControlError unless it is exactly one msgpack map."""
    try:
        message = msgpack.unpackb(body)
    except (ValueError, TypeError, UnpackException) as exc:
        raise ControlError(f"not a message ({exc})") from None
    if not isinstance(message, dict):
        raise ControlError(f"not a message (a {type(message).__name__}, not a map)")
    return message


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one message; ControlError if it is too large or not a map,
    `asyncio.IncompleteReadError` if the stream ends first."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_MESSAGE:
        raise ControlError("message too large")
    return decode(await reader.readexactly(length))


async def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode(message))
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
            sock.sendall(encode({"op": op}))
            (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
            if length > MAX_MESSAGE:
                raise ControlError("reply too large")
            return decode(_recv_exactly(sock, length))
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


# Serving end ----------------------------------------------------------------------------------
def answer(operations: Mapping[str, Operation], op: Any) -> dict[str, Any]:
    """The reply to operation `op`: its handler's, or an error naming an unknown op."""
    handler = operations.get(op) if isinstance(op, str) else None
    if handler is None:
        return {"ok": False, "error": f"unknown op {op!r}"}
    return handler()


def bind_private(path: Path) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from the moment it exists (bound under a
    umask: a chmod after bind leaves a window). Never replaces an existing file: OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


async def serve(path: Path, operations: Mapping[str, Operation]) -> asyncio.AbstractServer:
    """Answer requests on a unix socket at `path` (mode 0600) until the server is closed.

    An existing file at `path` is an error (OSError), never replaced: it is another launcher's
    (the launcher removes a dead one's before it gets here)."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_message(reader)
            await write_message(writer, answer(operations, request.get("op", "")))
        except Exception as exc:  # a broken client must not hurt the launcher
            log.debug("control connection failed: %s", exc)
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_connection, sock=bind_private(path))
