"""WHIP-style signaling (RFC 9725) and the demo page, over aiohttp.

POST   /v1/sessions        application/sdp offer -> 201, the answer, Location
DELETE /v1/sessions/{id}   end the session -> 204
GET    /v1/sessions/{id}   that session's stats (JSON)
GET    /v1/sessions/{id}/events   its conversation events (Server-Sent Events, docs/VOICE.md)
GET    /v1/stats           the transceiver's counters (JSON)
GET    /healthz            200 "ok"
GET    /                   the demo page (voicerelay/transceiver/web/), its files under /static/
GET    /favicon.ico        the page's icon (SVG)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.feed import EventFeed
from voicerelay.transceiver.sdp import SdpError
from voicerelay.transceiver.server import SessionLimit, TransceiverServer
from voicerelay.wire.token import load_keys

log = logging.getLogger("voicerelay.signaling")
WEB_DIR = Path(__file__).with_name("web")
MAX_OFFER = 64 * 1024
SERVER_KEY = web.AppKey("server", TransceiverServer)
KEEPALIVE_S = 15.0  # a comment line on an event stream after this much quiet
KEEPALIVE_KEY = web.AppKey("events_keepalive", float)
STREAMS_KEY = web.AppKey("event_streams", set[asyncio.Event])  # one stop signal per open stream
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a proxy in front must not hold events back
}
KEEPALIVE_LINE = b": keepalive\n\n"


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


async def post_session(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    if request.content_type != "application/sdp":
        return _text(415, "send the offer with Content-Type: application/sdp")
    if request.content_length is not None and request.content_length > MAX_OFFER:
        return _text(413, f"offer larger than {MAX_OFFER} bytes")
    body = await request.content.read(MAX_OFFER + 1)
    if len(body) > MAX_OFFER:
        return _text(413, f"offer larger than {MAX_OFFER} bytes")
    try:
        call_id, answer = server.create_session(body.decode("utf-8", "replace"))
    except SdpError as exc:
        return _text(400, f"bad offer: {exc}")
    except SessionLimit as exc:
        return _text(503, str(exc))
    location = f"/v1/sessions/{call_id}"
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": location, "ETag": f'"{call_id}"'},
    )


async def delete_session(request: web.Request) -> web.Response:
    if request.app[SERVER_KEY].delete_session(request.match_info["id"]):
        return web.Response(status=204)
    return _text(404, "no such session")


async def get_session(request: web.Request) -> web.Response:
    stats = request.app[SERVER_KEY].session_stats(request.match_info["id"])
    if stats is None:
        return _text(404, "no such session")
    return web.json_response(stats, dumps=_dumps)


def _dumps(obj: object) -> str:
    return json.dumps(obj, default=str)


def sse_message(event: dict[str, Any]) -> bytes:
    """One Server-Sent Events message: `data: <compact json>` and a blank line."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
    return b"data: " + data.encode() + b"\n\n"


async def get_events(request: web.Request) -> web.StreamResponse:
    """The session's conversation events as they happen, backlog first."""
    feed: EventFeed | None = request.app[SERVER_KEY].feed(request.match_info["id"])
    if feed is None:
        return _text(404, "no such session")
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    stop = asyncio.Event()
    streams = request.app[STREAMS_KEY]
    streams.add(stop)
    try:
        await _stream_events(feed, response, stop, request.app[KEEPALIVE_KEY])
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away: nothing more to write
    finally:
        streams.discard(stop)
    return response


async def _stream_events(
    feed: EventFeed, response: web.StreamResponse, stop: asyncio.Event, keepalive: float
) -> None:
    """Write the feed's events to `response` until the feed closes or `stop` is set; a
    keepalive comment after `keepalive` seconds of quiet. Leaves no task behind."""
    events = feed.subscribe()
    stopping = asyncio.ensure_future(stop.wait())
    pending: asyncio.Task[dict[str, Any] | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(events))
            done, _ = await asyncio.wait(
                {pending, stopping}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                return
            if pending not in done:
                await response.write(KEEPALIVE_LINE)
                continue
            event, pending = pending.result(), None
            if event is None:
                return  # the feed closed
            await response.write(sse_message(event))
    finally:
        await _cancel(stopping, pending)
        await events.aclose()


async def _next(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The next event, or None when the feed has ended."""
    return await anext(events, None)


async def _cancel(*futures: asyncio.Future[Any] | None) -> None:
    """Cancel helper tasks and wait until they are done."""
    live = [f for f in futures if f is not None and not f.done()]
    for future in live:
        future.cancel()
    if live:
        await asyncio.wait(live)


async def _end_streams(app: web.Application) -> None:
    """On shutdown, end every open event stream instead of waiting for its feed."""
    for stop in app[STREAMS_KEY]:
        stop.set()


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER_KEY].stats())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def index(request: web.Request) -> web.StreamResponse:
    page = WEB_DIR / "index.html"
    if not page.exists():
        return _text(404, "the demo page is not installed")
    return web.FileResponse(page)


async def favicon(request: web.Request) -> web.StreamResponse:
    icon = WEB_DIR / "favicon.svg"
    if not icon.exists():
        return _text(404, "no icon installed")
    return web.FileResponse(icon, headers={"Content-Type": "image/svg+xml"})


def make_app(server: TransceiverServer, *, keepalive: float = KEEPALIVE_S) -> web.Application:
    """The signaling routes and the demo page for `server`."""
    app = web.Application(client_max_size=MAX_OFFER * 2)
    app[SERVER_KEY] = server
    app[KEEPALIVE_KEY] = keepalive
    app[STREAMS_KEY] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_post("/v1/sessions", post_session)
    app.router.add_delete("/v1/sessions/{id}", delete_session)
    app.router.add_get("/v1/sessions/{id}", get_session)
    app.router.add_get("/v1/sessions/{id}/events", get_events)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    if WEB_DIR.is_dir():
        app.router.add_static("/static/", WEB_DIR)
    return app


def make_runner(server: TransceiverServer, **app_options: Any) -> web.AppRunner:
    """The app in a runner that cancels a handler whose client went away (an event stream
    then ends at once, not at its next keepalive)."""
    return web.AppRunner(
        make_app(server, **app_options), access_log=None, handler_cancellation=True
    )


class Transceiver:
    """UDP endpoint + HTTP signaling of one transceiver process."""

    def __init__(self, config: TransceiverConfig) -> None:
        self.config = config
        self.server = TransceiverServer(config, load_keys(config.secret_path))
        self._runner: web.AppRunner | None = None
        self.http_addr: tuple[str, int] = config.http

    async def start(self) -> None:
        await self.server.start()
        self._runner = make_runner(self.server)
        await self._runner.setup()
        site = web.TCPSite(self._runner, *self.config.http)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.http_addr = sockets[0].getsockname()[:2]
        log.info(
            "transceiver up: internal %s:%d, signaling http://%s:%d/, answers name relay %s:%d",
            *self.server.internal_addr,
            *self.http_addr,
            *self.config.relay_public,
        )

    async def stop(self) -> None:
        self.server.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def run_transceiver(config: TransceiverConfig, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or forever)."""
    transceiver = Transceiver(config)
    await transceiver.start()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await transceiver.stop()
