"""The launcher's control protocol: length-prefixed msgpack maps over a unix socket."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.relay import control

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


@given(st.binary(max_size=40))
def test_a_truncated_or_garbage_message_raises_and_never_hangs(data):
    """The launcher catches whatever this raises per connection; it must not block forever."""
    try:
        _read(data)
    except (asyncio.IncompleteReadError, control.ControlError, ValueError, TypeError):
        pass
    except Exception as exc:  # msgpack's own errors (ExtraData, FormatError, ...) are ValueErrors
        raise AssertionError(f"unexpected {type(exc).__name__}") from exc
