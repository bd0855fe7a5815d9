"""The Realtime-subset codec: every builder round-trips through its parser, anything else is a
ProtocolError with a reason (never another exception), and the size cap comes first."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.voice import realtime as rt

ids = st.text(min_size=1, max_size=40)
texts = st.text(max_size=200)
pcm = st.binary(max_size=4000).map(lambda b: b[: len(b) // 2 * 2])
ms = st.integers(0, 2**40)


def doc(text: str) -> dict[str, Any]:
    return json.loads(text)


# Client side: builders -> parse_client_event ---------------------------------------------------
@given(
    st.integers(1, 192000),
    st.none() | texts,
    st.none() | st.text(min_size=1, max_size=20),
)
def test_session_update_round_trip(rate: int, instructions: str | None, voice: str | None) -> None:
    text = rt.session_update(rate=rate, instructions=instructions, voice=voice)
    assert rt.parse_client_event(text) == rt.SessionUpdate(rate, True, instructions, voice)


def test_session_update_wire_shape() -> None:
    sent = doc(rt.session_update())
    assert sent["type"] == "session.update" and sent["event_id"]
    assert sent["session"] == {
        "type": "realtime",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
            "output": {"format": {"type": "audio/pcm", "rate": 24000}},
        },
    }
    full = doc(rt.session_update(instructions="be brief", voice="alloy"))["session"]
    assert full["instructions"] == "be brief" and full["audio"]["output"]["voice"] == "alloy"


@given(pcm)
def test_append_round_trip(audio: bytes) -> None:
    text = rt.input_audio_append(audio)
    assert doc(text)["audio"] == base64.b64encode(audio).decode()
    assert rt.parse_client_event(text) == rt.InputAppend(audio)


@given(st.none() | ids, ids, ms, st.integers(0, 5))
def test_other_client_events_round_trip(
    response_id: str | None, item_id: str, end_ms: int, content_index: int
) -> None:
    pairs: list[tuple[str, rt.ClientEvent]] = [
        (rt.input_audio_commit(), rt.InputCommit()),
        (rt.input_audio_clear(), rt.InputClear()),
        (rt.response_create(), rt.ResponseCreate()),
        (rt.response_cancel(response_id), rt.ResponseCancel(response_id)),
        (
            rt.item_truncate(item_id, end_ms, content_index),
            rt.ItemTruncate(item_id, content_index, end_ms),
        ),
    ]
    for text, expected in pairs:
        assert rt.parse_client_event(text) == expected
        assert rt.parse_server_event(text) == rt.Ignored(doc(text)["type"])  # not for clients


def test_session_update_defaults_and_limits() -> None:
    bare = '{"type":"session.update","session":{"type":"realtime"}}'
    assert rt.parse_client_event(bare) == rt.SessionUpdate(24000, False, None, None)
    for session in (
        {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 0}}}},
        {"audio": {"input": {"format": {"type": "audio/pcm", "rate": True}}}},
        {
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                "output": {"format": {"type": "audio/pcm", "rate": 16000}},
            }
        },
        {"audio": []},
        {"instructions": 5},
    ):
        with pytest.raises(rt.ProtocolError) as err:
            rt.parse_client_event(json.dumps({"type": "session.update", "session": session}))
        assert err.value.reason == "bad-field", session


# Server side: server_* builders -> parse_server_event ------------------------------------------
@given(ids, ids, ids, texts, pcm, ms, st.none() | st.text(min_size=1, max_size=30))
def test_server_events_round_trip(
    response_id: str,
    item_id: str,
    other_id: str,
    words: str,
    audio: bytes,
    end_ms: int,
    code: str | None,
) -> None:
    pairs: list[tuple[str, rt.ServerEvent]] = [
        (rt.server_session_created(), rt.SessionCreated()),
        (rt.server_session_updated(), rt.SessionUpdated()),
        (rt.server_input_committed(item_id), rt.InputCommitted(item_id)),
        (rt.server_input_committed(item_id, other_id), rt.InputCommitted(item_id)),
        (rt.server_input_cleared(), rt.Ignored("input_audio_buffer.cleared")),
        (rt.server_input_transcript(item_id, words), rt.InputTranscript(item_id, words)),
        (rt.server_response_created(response_id), rt.ResponseCreated(response_id)),
        (
            rt.server_output_item_added(response_id, item_id),
            rt.OutputItemAdded(response_id, item_id),
        ),
        (
            rt.server_audio_delta(response_id, item_id, audio),
            rt.AudioDelta(response_id, item_id, audio),
        ),
        (rt.server_audio_done(response_id, item_id), rt.AudioDone(response_id, item_id)),
        (
            rt.server_transcript_delta(response_id, item_id, words),
            rt.TranscriptDelta(response_id, item_id, words),
        ),
        (
            rt.server_transcript_done(response_id, item_id, words),
            rt.TranscriptDone(response_id, item_id, words),
        ),
        (
            rt.server_response_done(response_id, "cancelled"),
            rt.ResponseDone(response_id, "cancelled"),
        ),
        (rt.server_item_truncated(item_id, end_ms), rt.ItemTruncated(item_id, end_ms)),
        (rt.server_error(words, code), rt.ServerError(words, code)),
    ]
    for text, expected in pairs:
        assert rt.parse_server_event(text) == expected
        assert rt.parse_server_event(text.encode()) == expected  # bytes frames too
        assert rt.parse_client_event(text) == rt.Ignored(doc(text)["type"])


def test_event_ids_are_unique_unless_given() -> None:
    builders: list[Callable[[], str]] = [
        rt.session_update,
        rt.input_audio_commit,
        rt.response_create,
        lambda: rt.server_audio_delta("r", "i", b"\0\0"),
        rt.server_session_created,
    ]
    seen = [doc(build())["event_id"] for _ in range(200) for build in builders]
    assert all(isinstance(e, str) and e for e in seen) and len(set(seen)) == len(seen)
    assert doc(rt.response_cancel("r", event_id="mine"))["event_id"] == "mine"


# Anything else: ProtocolError with a reason, never another exception --------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
known_types = st.sampled_from(sorted(rt.SERVER_EVENT_TYPES | rt.CLIENT_EVENT_TYPES))
field_names = st.sampled_from(
    [
        *("session", "response", "item", "response_id", "item_id", "delta", "audio", "id"),
        *("transcript", "audio_end_ms", "content_index", "error", "status", "message", "code"),
    ]
)


@st.composite
def near_events(draw: st.DrawFn) -> str:
    """Events of a known type with plausible field names and arbitrary values."""
    fields = draw(
        st.dictionaries(field_names, json_values | st.dictionaries(field_names, json_values))
    )
    return json.dumps({"type": draw(known_types), **fields})


def parses_or_protocol_error(parse: Callable[[Any], Any], data: Any) -> None:
    try:
        parse(data)
    except rt.ProtocolError as exc:
        assert exc.reason in rt.REASONS and str(exc)


@given(st.text() | st.binary() | near_events())
def test_anything_else_is_a_protocol_error(data: str | bytes) -> None:
    parses_or_protocol_error(rt.parse_server_event, data)
    parses_or_protocol_error(rt.parse_client_event, data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("", "not-json"),
        ("{nope", "not-json"),
        (b"\xff\xfe{}", "not-json"),
        ("[" * 100_000, "not-json"),  # nesting deeper than the parser's recursion
        ("1" * 5000, "not-json"),  # an integer past Python's digit limit
        ("[1]", "not-object"),
        ('"type"', "not-object"),
        ("{}", "no-type"),
        ('{"type": null}', "no-type"),
        (
            '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AA="}',
            "bad-audio",
        ),
        (
            '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AAA"}',
            "bad-audio",
        ),
        (
            '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AQID"}',
            "bad-audio",
        ),
        (
            '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"é"}',
            "bad-audio",
        ),
        (
            '{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":7}',
            "bad-field",
        ),
        ('{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA"}', "bad-field"),
        ('{"type":"response.created","response":{}}', "bad-field"),
        ('{"type":"response.done","response":{"id":"r"}}', "bad-field"),
        ('{"type":"error","error":"boom"}', "bad-field"),
        ('{"type":"error","error":{"message":"m","code":5}}', "bad-field"),
        ('{"type":"conversation.item.truncated","item_id":"i","audio_end_ms":-1}', "bad-field"),
        ('{"type":"conversation.item.truncated","item_id":"i","audio_end_ms":1.5}', "bad-field"),
        ('{"type":"conversation.item.truncated","item_id":"i","audio_end_ms":true}', "bad-field"),
    ],
)
def test_each_server_side_reason(data: str | bytes, reason: str) -> None:
    with pytest.raises(rt.ProtocolError) as err:
        rt.parse_server_event(data)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"type":"input_audio_buffer.append","audio":"AAE"}', "bad-audio"),
        ('{"type":"input_audio_buffer.append"}', "bad-field"),
        ('{"type":"input_audio_buffer.append","audio":"AQID"}', "bad-audio"),  # 3 bytes
        ('{"type":"response.cancel","response_id":3}', "bad-field"),
        ('{"type":"conversation.item.truncate","item_id":"i"}', "bad-field"),
        (
            '{"type":"conversation.item.truncate","item_id":"i","audio_end_ms":1,"content_index":-1}',
            "bad-field",
        ),
        ('{"type":"session.update"}', "bad-field"),
    ],
)
def test_each_client_side_reason(data: str, reason: str) -> None:
    with pytest.raises(rt.ProtocolError) as err:
        rt.parse_client_event(data)
    assert err.value.reason == reason


def test_every_reason_is_reachable() -> None:
    samples = {
        "{": "not-json",
        "[]": "not-object",
        "{}": "no-type",
        '{"type":"input_audio_buffer.append","audio":"A"}': "bad-audio",
        '{"type":"response.cancel","response_id":1}': "bad-field",
        rt.input_audio_append(bytes(1 << 20)): "oversized",
    }
    reasons = {}
    for sample in samples:
        with pytest.raises(rt.ProtocolError) as err:
            rt.parse_client_event(sample)
        reasons[sample] = err.value.reason
    assert reasons == samples and set(reasons.values()) == set(rt.REASONS)


# Size cap: checked first, in UTF-8 bytes --------------------------------------------------------
def test_oversized_is_rejected_before_parsing() -> None:
    cap = 1000
    # not JSON, not UTF-8, nested past the recursion limit: the size decides before any of it
    for data in ("{" * (cap + 1), b"\xff" * (cap + 1), "[" * (cap + 1)):
        with pytest.raises(rt.ProtocolError) as err:
            rt.parse_server_event(data, max_bytes=cap)
        assert err.value.reason == "oversized"
    event = rt.server_audio_delta("r", "i", bytes(600))
    assert isinstance(rt.parse_server_event(event, max_bytes=len(event)), rt.AudioDelta)
    with pytest.raises(rt.ProtocolError) as err:
        rt.parse_server_event(event, max_bytes=len(event) - 1)
    assert err.value.reason == "oversized"


def test_size_counts_utf8_bytes_not_characters() -> None:
    words = "é" * 600  # 600 characters, 1200 bytes
    event = json.dumps({"type": "x", "t": words}, ensure_ascii=False)
    assert len(event) < 1000 < len(event.encode())
    with pytest.raises(rt.ProtocolError) as err:
        rt.parse_client_event(event, max_bytes=1000)
    assert err.value.reason == "oversized"
    assert rt.parse_client_event(event, max_bytes=2000) == rt.Ignored("x")


def test_default_cap_is_one_mebibyte() -> None:
    big = rt.input_audio_append(bytes(800_000))  # ~1.07 MB of base64
    with pytest.raises(rt.ProtocolError) as err:
        rt.parse_client_event(big)
    assert err.value.reason == "oversized" and rt.MAX_EVENT_BYTES == 1 << 20
    assert rt.parse_client_event(rt.input_audio_append(bytes(700_000))).pcm == bytes(700_000)
