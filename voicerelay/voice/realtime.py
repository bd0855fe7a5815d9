"""The OpenAI Realtime subset voicerelay speaks (docs/REALTIME.md): build and validate events.

Pure: JSON text in, frozen dataclasses out, and back. Both sides live here: the client side
(what the bridge sends and reads) and the server side (what the reference agent reads and
sends). Audio is base64 of little-endian int16 mono PCM at 24 kHz (`audio/pcm`). Parsers raise
only `ProtocolError`, whose `reason` names the failure for counting.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REALTIME_RATE = 24000
MAX_EVENT_BYTES = 1 << 20  # default cap on one event's JSON text (UTF-8 bytes)
REASONS = ("not-json", "not-object", "no-type", "oversized", "bad-audio", "bad-field")

_PCM_FORMAT = "audio/pcm"


class ProtocolError(ValueError):
    """An event that cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Event ids -----------------------------------------------------------------------------------
_ID_PREFIX = os.urandom(6).hex()  # per process, so ids from two processes do not collide
_ID_COUNTER = itertools.count(1)


def new_id(kind: str = "event") -> str:
    """A fresh id unique in this process and very likely across processes: `event_<hex>_<n>`."""
    return f"{kind}_{_ID_PREFIX}_{next(_ID_COUNTER)}"


def _event(type_: str, event_id: str | None, **fields: Any) -> str:
    doc = {"type": type_, "event_id": event_id or new_id("event"), **fields}
    return json.dumps(doc, separators=(",", ":"))


def encode_audio(pcm: bytes) -> str:
    """PCM bytes as the base64 text of an audio field."""
    return base64.b64encode(pcm).decode("ascii")


def decode_audio(value: Any) -> bytes:
    """Strict base64 of an even number of bytes (int16 samples), else ProtocolError
    (`bad-field` when it is missing or not a string, `bad-audio` when it is not such base64)."""
    if not isinstance(value, str):
        raise ProtocolError("bad-field", "audio field missing or not a string")
    try:
        pcm = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad-audio", "audio is not valid base64") from None
    if len(pcm) % 2:
        raise ProtocolError(
            "bad-audio", f"audio is {len(pcm)} bytes: int16 PCM needs an even count"
        )
    return pcm


# Client -> server builders -------------------------------------------------------------------
def session_update(
    *,
    rate: int = REALTIME_RATE,
    instructions: str | None = None,
    voice: str | None = None,
    event_id: str | None = None,
) -> str:
    """session.update: PCM both ways at `rate`, server turn detection off."""
    output: dict[str, Any] = {"format": {"type": _PCM_FORMAT, "rate": rate}}
    if voice is not None:
        output["voice"] = voice
    session: dict[str, Any] = {
        "type": "realtime",
        "audio": {
            "input": {"format": {"type": _PCM_FORMAT, "rate": rate}, "turn_detection": None},
            "output": output,
        },
    }
    if instructions is not None:
        session["instructions"] = instructions
    return _event("session.update", event_id, session=session)


def input_audio_append(pcm: bytes, *, event_id: str | None = None) -> str:
    """input_audio_buffer.append: more of the person's audio."""
    return _event("input_audio_buffer.append", event_id, audio=encode_audio(pcm))


def input_audio_commit(*, event_id: str | None = None) -> str:
    """input_audio_buffer.commit: the buffered audio is one user turn."""
    return _event("input_audio_buffer.commit", event_id)


def input_audio_clear(*, event_id: str | None = None) -> str:
    """input_audio_buffer.clear: drop the uncommitted audio."""
    return _event("input_audio_buffer.clear", event_id)


def response_create(*, event_id: str | None = None) -> str:
    """response.create: answer now."""
    return _event("response.create", event_id)


def response_cancel(response_id: str | None = None, *, event_id: str | None = None) -> str:
    """response.cancel: stop the response in progress (this one, when named)."""
    fields = {} if response_id is None else {"response_id": response_id}
    return _event("response.cancel", event_id, **fields)


def item_truncate(
    item_id: str, audio_end_ms: int, content_index: int = 0, *, event_id: str | None = None
) -> str:
    """conversation.item.truncate: the person heard only `audio_end_ms` of this reply."""
    return _event(
        "conversation.item.truncate",
        event_id,
        item_id=item_id,
        content_index=content_index,
        audio_end_ms=audio_end_ms,
    )


# Server -> client events ---------------------------------------------------------------------
@dataclass(frozen=True)
class SessionCreated:
    """The server accepted the connection."""


@dataclass(frozen=True)
class SessionUpdated:
    """The server applied a session.update."""


@dataclass(frozen=True)
class InputCommitted:
    """The input buffer became user item `item_id`."""

    item_id: str


@dataclass(frozen=True)
class InputTranscript:
    """What the server heard in user item `item_id`."""

    item_id: str
    transcript: str


@dataclass(frozen=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True)
class OutputItemAdded:
    """The response's assistant item (the one a truncate names)."""

    response_id: str
    item_id: str


@dataclass(frozen=True)
class AudioDelta:
    response_id: str
    item_id: str
    pcm: bytes  # int16 little-endian mono, even length


@dataclass(frozen=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True)
class TranscriptDelta:
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True)
class TranscriptDone:
    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    status: str  # "completed" | "cancelled" | "failed" | "incomplete"


@dataclass(frozen=True)
class ItemTruncated:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class ServerError:
    message: str
    code: str | None


@dataclass(frozen=True)
class Ignored:
    """A well-formed event of a type outside the subset (either direction)."""

    type: str


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | InputCommitted
    | InputTranscript
    | ResponseCreated
    | OutputItemAdded
    | AudioDelta
    | AudioDone
    | TranscriptDelta
    | TranscriptDone
    | ResponseDone
    | ItemTruncated
    | ServerError
    | Ignored
)


# Client -> server events (the reference agent's side) ---------------------------------------
@dataclass(frozen=True)
class SessionUpdate:
    rate: int  # input and output PCM rate (the input format's; default 24000)
    turn_detection_off: bool  # audio.input.turn_detection was given as null
    instructions: str | None
    voice: str | None = None


@dataclass(frozen=True)
class InputAppend:
    pcm: bytes


@dataclass(frozen=True)
class InputCommit:
    pass


@dataclass(frozen=True)
class InputClear:
    pass


@dataclass(frozen=True)
class ResponseCreate:
    pass


@dataclass(frozen=True)
class ResponseCancel:
    response_id: str | None


@dataclass(frozen=True)
class ItemTruncate:
    item_id: str
    content_index: int
    audio_end_ms: int


ClientEvent = (
    SessionUpdate
    | InputAppend
    | InputCommit
    | InputClear
    | ResponseCreate
    | ResponseCancel
    | ItemTruncate
    | Ignored
)


# Validation helpers ---------------------------------------------------------------------------
def _load(text: str | bytes, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """The event's type and object; size is checked before any parsing."""
    if isinstance(text, str):
        # characters <= UTF-8 bytes: encode (to count bytes) only what might fit
        size = len(text) if len(text) > max_bytes else len(text.encode("utf-8", "surrogatepass"))
    else:
        size = len(text)
    if size > max_bytes:
        raise ProtocolError("oversized", f"event is over the {max_bytes}-byte limit")
    try:
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8")
        doc = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int limits
        raise ProtocolError("not-json", "event is not JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError("not-object", "event is not a JSON object")
    type_ = doc.get("type")
    if not isinstance(type_, str):
        raise ProtocolError("no-type", "event has no string 'type'")
    return type_, doc


def _obj(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ProtocolError("bad-field", f"{where}: '{key}' must be an object")
    return value


def _str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise ProtocolError("bad-field", f"{where}: '{key}' must be a string")
    return value


def _opt_str(doc: dict[str, Any], key: str, where: str) -> str | None:
    return None if doc.get(key) is None else _str(doc, key, where)


def _int(doc: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("bad-field", f"{where}: '{key}' must be a non-negative integer")
    return value


# Server -> client parsing ---------------------------------------------------------------------
def _error(doc: dict[str, Any]) -> ServerError:
    error = _obj(doc, "error", "error")
    return ServerError(_str(error, "message", "error"), _opt_str(error, "code", "error"))


_SERVER_PARSERS: dict[str, Callable[[dict[str, Any], str], ServerEvent]] = {
    "session.created": lambda d, w: SessionCreated(),
    "session.updated": lambda d, w: SessionUpdated(),
    "input_audio_buffer.committed": lambda d, w: InputCommitted(_str(d, "item_id", w)),
    "conversation.item.input_audio_transcription.completed": lambda d, w: InputTranscript(
        _str(d, "item_id", w), _str(d, "transcript", w)
    ),
    "response.created": lambda d, w: ResponseCreated(_str(_obj(d, "response", w), "id", w)),
    "response.output_item.added": lambda d, w: OutputItemAdded(
        _str(d, "response_id", w), _str(_obj(d, "item", w), "id", w)
    ),
    "response.output_audio.delta": lambda d, w: AudioDelta(
        _str(d, "response_id", w), _str(d, "item_id", w), decode_audio(d.get("delta"))
    ),
    "response.output_audio.done": lambda d, w: AudioDone(
        _str(d, "response_id", w), _str(d, "item_id", w)
    ),
    "response.output_audio_transcript.delta": lambda d, w: TranscriptDelta(
        _str(d, "response_id", w), _str(d, "item_id", w), _str(d, "delta", w)
    ),
    "response.output_audio_transcript.done": lambda d, w: TranscriptDone(
        _str(d, "response_id", w), _str(d, "item_id", w), _str(d, "transcript", w)
    ),
    "response.done": lambda d, w: ResponseDone(
        _str(_obj(d, "response", w), "id", w), _str(_obj(d, "response", w), "status", w)
    ),
    "conversation.item.truncated": lambda d, w: ItemTruncated(
        _str(d, "item_id", w), _int(d, "audio_end_ms", w)
    ),
    "error": lambda d, w: _error(d),
}


SERVER_EVENT_TYPES = frozenset(_SERVER_PARSERS)  # server event types the subset reads


def parse_server_event(text: str | bytes, max_bytes: int = MAX_EVENT_BYTES) -> ServerEvent:
    """One server event, validated; raises only ProtocolError."""
    type_, doc = _load(text, max_bytes)
    parser = _SERVER_PARSERS.get(type_)
    return Ignored(type_) if parser is None else parser(doc, type_)


# Client -> server parsing ---------------------------------------------------------------------
def _session_update(doc: dict[str, Any], where: str) -> SessionUpdate:
    session = _obj(doc, "session", where)
    audio = session.get("audio", {})
    if not isinstance(audio, dict):
        raise ProtocolError("bad-field", f"{where}: 'session.audio' must be an object")
    inp = audio.get("input", {})
    out = audio.get("output", {})
    if not isinstance(inp, dict) or not isinstance(out, dict):
        raise ProtocolError("bad-field", f"{where}: audio input/output must be objects")
    rate = _pcm_rate(inp, where)
    if "format" in out and _pcm_rate(out, where) != rate:
        raise ProtocolError("bad-field", f"{where}: input and output rates differ")
    turn_off = "turn_detection" in inp and inp["turn_detection"] is None
    return SessionUpdate(
        rate=rate,
        turn_detection_off=turn_off,
        instructions=_opt_str(session, "instructions", where),
        voice=_opt_str(out, "voice", where),
    )


def _pcm_rate(direction: dict[str, Any], where: str) -> int:
    fmt = direction.get("format", {"type": _PCM_FORMAT})
    if not isinstance(fmt, dict) or fmt.get("type") != _PCM_FORMAT:
        raise ProtocolError("bad-field", f"{where}: only format type '{_PCM_FORMAT}' is supported")
    rate = _int(fmt, "rate", where, REALTIME_RATE)
    if rate == 0:
        raise ProtocolError("bad-field", f"{where}: 'rate' must be positive")
    return rate


_CLIENT_PARSERS: dict[str, Callable[[dict[str, Any], str], ClientEvent]] = {
    "session.update": _session_update,
    "input_audio_buffer.append": lambda d, w: InputAppend(decode_audio(d.get("audio"))),
    "input_audio_buffer.commit": lambda d, w: InputCommit(),
    "input_audio_buffer.clear": lambda d, w: InputClear(),
    "response.create": lambda d, w: ResponseCreate(),
    "response.cancel": lambda d, w: ResponseCancel(_opt_str(d, "response_id", w)),
    "conversation.item.truncate": lambda d, w: ItemTruncate(
        _str(d, "item_id", w), _int(d, "content_index", w, 0), _int(d, "audio_end_ms", w)
    ),
}


CLIENT_EVENT_TYPES = frozenset(_CLIENT_PARSERS)  # client event types the agent reads


def parse_client_event(text: str | bytes, max_bytes: int = MAX_EVENT_BYTES) -> ClientEvent:
    """One client event, validated; raises only ProtocolError."""
    type_, doc = _load(text, max_bytes)
    parser = _CLIENT_PARSERS.get(type_)
    return Ignored(type_) if parser is None else parser(doc, type_)


# Server -> client builders (the reference agent, and test servers) ----------------------------
def server_session_created(*, event_id: str | None = None) -> str:
    session = {"type": "realtime", "id": new_id("sess")}
    return _event("session.created", event_id, session=session)


def server_session_updated(*, rate: int = REALTIME_RATE, event_id: str | None = None) -> str:
    fmt = {"type": _PCM_FORMAT, "rate": rate}
    session = {
        "type": "realtime",
        "audio": {"input": {"format": fmt, "turn_detection": None}, "output": {"format": fmt}},
    }
    return _event("session.updated", event_id, session=session)


def server_input_committed(
    item_id: str, previous_item_id: str | None = None, *, event_id: str | None = None
) -> str:
    return _event(
        "input_audio_buffer.committed",
        event_id,
        previous_item_id=previous_item_id,
        item_id=item_id,
    )


def server_input_cleared(*, event_id: str | None = None) -> str:
    return _event("input_audio_buffer.cleared", event_id)


def server_input_transcript(item_id: str, transcript: str, *, event_id: str | None = None) -> str:
    return _event(
        "conversation.item.input_audio_transcription.completed",
        event_id,
        item_id=item_id,
        content_index=0,
        transcript=transcript,
    )


def server_response_created(response_id: str, *, event_id: str | None = None) -> str:
    response = {"id": response_id, "object": "realtime.response", "status": "in_progress"}
    return _event("response.created", event_id, response=response)


def server_output_item_added(response_id: str, item_id: str, *, event_id: str | None = None) -> str:
    item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress"}
    return _event(
        "response.output_item.added", event_id, response_id=response_id, output_index=0, item=item
    )


def _content(response_id: str, item_id: str) -> dict[str, Any]:
    return {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}


def server_audio_delta(
    response_id: str, item_id: str, pcm: bytes, *, event_id: str | None = None
) -> str:
    return _event(
        "response.output_audio.delta",
        event_id,
        **_content(response_id, item_id),
        delta=encode_audio(pcm),
    )


def server_audio_done(response_id: str, item_id: str, *, event_id: str | None = None) -> str:
    return _event("response.output_audio.done", event_id, **_content(response_id, item_id))


def server_transcript_delta(
    response_id: str, item_id: str, delta: str, *, event_id: str | None = None
) -> str:
    return _event(
        "response.output_audio_transcript.delta",
        event_id,
        **_content(response_id, item_id),
        delta=delta,
    )


def server_transcript_done(
    response_id: str, item_id: str, transcript: str, *, event_id: str | None = None
) -> str:
    return _event(
        "response.output_audio_transcript.done",
        event_id,
        **_content(response_id, item_id),
        transcript=transcript,
    )


def server_response_done(response_id: str, status: str, *, event_id: str | None = None) -> str:
    response = {"id": response_id, "object": "realtime.response", "status": status}
    return _event("response.done", event_id, response=response)


def server_item_truncated(
    item_id: str, audio_end_ms: int, content_index: int = 0, *, event_id: str | None = None
) -> str:
    return _event(
        "conversation.item.truncated",
        event_id,
        item_id=item_id,
        content_index=content_index,
        audio_end_ms=audio_end_ms,
    )


def server_error(
    message: str,
    code: str | None = None,
    *,
    client_event_id: str | None = None,
    event_id: str | None = None,
) -> str:
    """error: `code` is machine-readable (ours: a ProtocolError reason or an API-style code)."""
    error = {
        "type": "invalid_request_error",
        "code": code,
        "message": message,
        "param": None,
        "event_id": client_event_id,
    }
    return _event("error", event_id, error=error)
