"""The launcher's control socket: length-prefixed msgpack maps over a unix socket, both ends."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from voicerelay.relay import control
from voicerelay.relay.config import RelayConfig

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=12), values, max_size=6)


class _Sink:
    """Enough of a StreamWriter for write_message."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


def _read(data: bytes) -> dict:
    async def go() -> dict:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await control.read_message(reader)

    return asyncio.run(go())


@given(messages)
def test_messages_round_trip(message):
    sink = _Sink()
    asyncio.run(control.write_message(sink, message))  # type: ignore[arg-type]
    (length,) = struct.unpack_from("!I", sink.data)
    assert length == len(sink.data) - 4
    assert _read(sink.data) == message


def test_an_oversized_length_is_refused_before_reading_the_body():
    with pytest.raises(control.ControlError, match="too large"):
        _read(struct.pack("!I", control.MAX_MESSAGE + 1))


def _one_framed_map(data: bytes) -> bool:
    """Does `data` start with one whole, well-formed message (a length, then a msgpack map)?"""
    if len(data) < 4:
        return False
    (length,) = struct.unpack_from("!I", data)
    if length > control.MAX_MESSAGE or len(data) < 4 + length:
        return False
    try:
        return isinstance(msgpack.unpackb(data[4 : 4 + length]), dict)
    except Exception:
        return False


@given(messages, st.data())
def test_a_truncated_message_raises_incomplete_read(message, data):
    whole = msgpack.packb(message)
    framed = struct.pack("!I", len(whole)) + whole
    cut = data.draw(st.integers(0, len(framed) - 1))
    with pytest.raises(asyncio.IncompleteReadError):
        _read(framed[:cut])


@given(st.binary(max_size=40))
def test_garbage_raises_and_never_hangs(data):
    """The launcher catches whatever this raises per connection; it must not block forever."""
    assume(not _one_framed_map(data))
    with pytest.raises((asyncio.IncompleteReadError, control.ControlError)):
        _read(data)


@pytest.mark.parametrize(
    "body", [msgpack.packb(1), msgpack.packb([1, 2]), b"\xc1", b"\x81\x90\x01"]
)
def test_a_whole_message_that_is_not_a_map_is_refused(body):
    with pytest.raises(control.ControlError, match="not a message"):
        _read(struct.pack("!I", len(body)) + body)


def test_operations_are_answered_and_unknown_ones_named():
    operations = {"status": lambda: {"ok": True}}
    assert control.answer(operations, "status") == {"ok": True}
    assert control.answer(operations, "reboot") == {"ok": False, "error": "unknown op 'reboot'"}
    assert control.answer(operations, ["status"])["ok"] is False  # not even a name


def test_a_served_socket_answers_one_request_per_connection(tmp_path):
    """Both ends for real: `serve` on a unix socket, `request` from a client, mode 0600."""
    config = RelayConfig(listen_port=40000, state_dir=tmp_path, workers=1)

    async def go() -> tuple[dict, dict, int]:
        server = await control.serve(config.control_socket, {"status": lambda: {"ok": True}})
        try:
            loop = asyncio.get_running_loop()
            known = await loop.run_in_executor(None, control.request, config, "status")
            unknown = await loop.run_in_executor(None, control.request, config, "nope")
        finally:
            server.close()
        return known, unknown, config.control_socket.stat().st_mode & 0o777

    known, unknown, mode = asyncio.run(go())
    assert known == {"ok": True}
    assert unknown == {"ok": False, "error": "unknown op 'nope'"}
    assert mode == 0o600


def test_a_second_server_never_replaces_a_live_socket(tmp_path):
    """Binding over an existing socket file fails (asyncio's own unix server would unlink it,
    cutting `relayctl` off from the launcher that owns it)."""
    config = RelayConfig(listen_port=40002, state_dir=tmp_path, workers=1)

    async def go() -> tuple[type, dict]:
        first = await control.serve(config.control_socket, {"status": lambda: {"ok": 1}})
        try:
            try:
                await control.serve(config.control_socket, {"status": lambda: {"ok": 2}})
            except OSError as exc:
                refused: type = type(exc)
            else:
                refused = type(None)
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(None, control.request, config, "status")
        finally:
            first.close()
        return refused, reply

    refused, reply = asyncio.run(go())
    assert issubclass(refused, OSError)
    assert reply == {"ok": 1}  # still the first server's socket


def test_the_socket_is_private_whatever_the_callers_umask_and_leaves_it_as_it_was(tmp_path):
    import os

    path = tmp_path / "c.sock"
    old = os.umask(0)  # the most permissive caller
    try:
        sock = control.bind_private(path)
    finally:
        os.umask(old)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert os.umask(old) == old  # the caller's umask is back
    finally:
        sock.close()
