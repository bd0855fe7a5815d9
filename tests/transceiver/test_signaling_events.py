"""GET /v1/sessions/{id}/events over a real aiohttp server on a loopback port: the backlog then
live events as Server-Sent Events, keepalives, the end of the stream, no handler left behind."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from voicerelay.transceiver import signaling
from voicerelay.transceiver.feed import EventFeed
from voicerelay.transceiver.signaling import STREAMS_KEY, make_app, make_runner

T0 = 500.0


class Feeds:
    """Stands in for TransceiverServer: only `feed(call_id)` is used by the events route."""

    def __init__(self) -> None:
        self.feeds: dict[str, EventFeed] = {}

    def feed(self, call_id: str) -> EventFeed | None:
        return self.feeds.get(call_id)

    def add(self, call_id: str) -> EventFeed:
        feed = self.feeds[call_id] = EventFeed(T0)
        return feed


@asynccontextmanager
async def serving(
    server: Any, *, keepalive: float = 15.0, cancel_on_disconnect: bool = True
) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """The signaling app for `server` (a TransceiverServer or a `Feeds`) on 127.0.0.1, a free
    port: (base URL, runner)."""
    if cancel_on_disconnect:  # as the transceiver runs it
        runner = make_runner(server, keepalive=keepalive)
    else:
        runner = web.AppRunner(make_app(server, keepalive=keepalive))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


async def message(response: aiohttp.ClientResponse) -> bytes:
    """One SSE message (up to and including its blank line), b"" at the end of the stream."""
    lines = []
    async with asyncio.timeout(5):
        while line := await response.content.readline():
            lines.append(line)
            if line == b"\n":
                break
    return b"".join(lines)


def data(raw: bytes) -> dict[str, Any]:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2, raw
    return json.loads(raw[len(b"data: ") : -2])


async def until(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_unknown_session_is_a_one_line_404():
    async def body() -> None:
        async with (
            serving(Feeds()) as (url, _),
            aiohttp.ClientSession() as http,
            http.get(url + "/v1/sessions/nope/events") as r,
        ):
            assert r.status == 404
            assert await r.text() == "no such session\n"

    asyncio.run(body())


def test_the_backlog_then_live_events_then_the_end():
    async def body() -> None:
        feeds = Feeds()
        feed = feeds.add("c1")
        feed.publish("call.started", T0 + 0.25)
        feed.publish("user.transcript", T0 + 1.5, item_id="u1", text='héllo "there"\nok')
        async with (
            serving(feeds) as (url, runner),
            aiohttp.ClientSession() as http,
            http.get(url + "/v1/sessions/c1/events") as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            assert r.headers["Cache-Control"] == "no-cache"
            assert data(await message(r)) == {"type": "call.started", "at_ms": 250}
            assert (
                data(await message(r))["text"] == 'héllo "there"\nok'
            )  # one line: JSON escapes newlines
            feed.publish("agent.speaking", T0 + 2, item_id="a1")
            assert data(await message(r)) == {
                "type": "agent.speaking",
                "at_ms": 2000,
                "item_id": "a1",
            }
            feed.close(T0 + 3, "deleted")
            assert data(await message(r)) == {
                "type": "call.ended",
                "at_ms": 3000,
                "reason": "deleted",
            }
            assert await message(r) == b""  # the stream ended with the feed
            await until(lambda: not runner.app[STREAMS_KEY], "the handler to finish")

    asyncio.run(body())


def test_quiet_streams_get_keepalive_comments():
    async def body() -> None:
        feeds = Feeds()
        feed = feeds.add("c1")
        async with (
            serving(feeds, keepalive=0.05) as (url, _),
            aiohttp.ClientSession() as http,
            http.get(url + "/v1/sessions/c1/events") as r,
        ):
            assert await message(r) == b": keepalive\n\n"
            assert await message(r) == b": keepalive\n\n"
            feed.publish("user.speech_started", T0 + 1)
            while (raw := await message(r)) == b": keepalive\n\n":
                pass
            assert data(raw)["type"] == "user.speech_started"

    asyncio.run(body())


def test_a_closed_feed_gives_its_backlog_and_ends():
    async def body() -> None:
        feeds = Feeds()
        feed = feeds.add("c1")
        feed.publish("call.started", T0 + 1)
        feed.close(T0 + 2, "consent")
        async with (
            serving(feeds) as (url, _),
            aiohttp.ClientSession() as http,
            http.get(url + "/v1/sessions/c1/events") as r,
        ):
            body = await r.read()
        assert body == (
            b'data: {"type":"call.started","at_ms":1000}\n\n'
            b'data: {"type":"call.ended","at_ms":2000,"reason":"consent"}\n\n'
        )

    asyncio.run(body())


async def _client_goes_away(*, cancel_on_disconnect: bool, keepalive: float, talk: bool) -> None:
    """A client reads one event and drops the connection: the handler, its subscription and
    every task it started must end (`talk`: the call keeps publishing meanwhile)."""
    feeds = Feeds()
    feed = feeds.add("c1")
    feed.publish("call.started", T0 + 1)
    options = {"keepalive": keepalive, "cancel_on_disconnect": cancel_on_disconnect}
    async with serving(feeds, **options) as (url, runner):
        baseline = asyncio.all_tasks()
        http = aiohttp.ClientSession()
        r = await http.get(url + "/v1/sessions/c1/events")
        assert data(await message(r))["type"] == "call.started"
        assert feed.subscribers == 1 and len(runner.app[STREAMS_KEY]) == 1
        r.close()  # drop the connection mid-stream
        await http.close()

        def handler_ended() -> bool:
            if talk:
                feed.publish("agent.transcript", T0 + 2, item_id="a1", text="x", final=False)
            return not runner.app[STREAMS_KEY]

        await until(handler_ended, "the handler to end")
        await until(lambda: feed.subscribers == 0, "the subscription to end")
        await until(lambda: asyncio.all_tasks() <= baseline, "every task of the stream to end")
        assert not feed.closed  # the call itself goes on


def test_the_client_going_away_cancels_the_handler_at_once():
    asyncio.run(_client_goes_away(cancel_on_disconnect=True, keepalive=15.0, talk=False))


def test_without_handler_cancellation_the_next_keepalive_notices_the_client_left():
    asyncio.run(_client_goes_away(cancel_on_disconnect=False, keepalive=0.05, talk=False))


def test_without_handler_cancellation_the_next_event_notices_the_client_left():
    asyncio.run(_client_goes_away(cancel_on_disconnect=False, keepalive=15.0, talk=True))


def test_shutting_down_ends_open_streams_at_once():
    async def body() -> None:
        feeds = Feeds()
        feeds.add("c1")
        async with serving(feeds) as (url, runner), aiohttp.ClientSession() as http:
            r = await http.get(url + "/v1/sessions/c1/events")
            await until(lambda: runner.app[STREAMS_KEY], "the stream to open")
            started = time.monotonic()
            await asyncio.wait_for(runner.cleanup(), 5)  # aiohttp would wait 60 s for it
            assert time.monotonic() - started < 2
            assert await r.read() == b""  # a clean end, not a reset
            r.close()

    asyncio.run(body())


def test_the_favicon_is_served():
    async def body() -> None:
        async with (
            serving(Feeds()) as (url, _),
            aiohttp.ClientSession() as http,
            http.get(url + "/favicon.ico") as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"] == "image/svg+xml"
            assert (await r.read()).startswith(b"<svg")

    asyncio.run(body())


def test_the_route_list_in_the_module_docstring_is_current():
    app = make_app(Feeds())  # type: ignore[arg-type]
    doc = signaling.__doc__ or ""
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method != "HEAD":
            assert f"{path}" in doc, f"{route.method} {path} missing from the docstring"


def test_a_real_session_streams_until_it_is_deleted():
    """Against the transceiver's own server: the route finds the session's feed, and deleting
    the session ends the stream with call.ended."""
    from tests.transceiver.test_server import new_server
    from voicerelay.transceiver import sdp
    from voicerelay.transceiver.certificate import Certificate

    async def body() -> None:
        server = new_server()
        offer = sdp.build_offer(
            ice_ufrag="cli1",
            ice_pwd="p" * 22,
            fingerprint=Certificate.generate().fingerprint,
            ssrc=1234,
            cname="test",
        )
        async with serving(server) as (url, runner), aiohttp.ClientSession() as http:
            headers = {"Content-Type": "application/sdp"}
            async with http.post(url + "/v1/sessions", data=offer, headers=headers) as r:
                assert r.status == 201
                location = r.headers["Location"]
            async with http.get(url + location + "/events") as events:
                assert events.status == 200
                await until(lambda: runner.app[STREAMS_KEY], "the stream to open")
                async with http.delete(url + location) as r:
                    assert r.status == 204
                messages = []
                while raw := await message(events):
                    messages.append(data(raw))
            assert messages[-1]["type"] == "call.ended", messages
            async with http.get(url + location + "/events") as gone:
                assert gone.status == 404  # the session is gone

    asyncio.run(body())
