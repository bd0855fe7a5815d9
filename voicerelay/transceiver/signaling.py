"""WHIP-style signaling (RFC 9725) and the demo page, over aiohttp.

POST   /v1/sessions        application/sdp offer -> 201, the answer, Location
DELETE /v1/sessions/{id}   end the session -> 204
GET    /v1/sessions/{id}   that session's stats (JSON)
GET    /v1/stats           the transceiver's counters (JSON)
GET    /healthz            200 "ok"
GET    /                   the demo page (voicerelay/transceiver/web/)
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.sdp import SdpError
from voicerelay.transceiver.server import SessionLimit, TransceiverServer
from voicerelay.wire.token import load_keys

log = logging.getLogger("voicerelay.signaling")
WEB_DIR = Path(__file__).with_name("web")
MAX_OFFER = 64 * 1024
SERVER_KEY = web.AppKey("server", TransceiverServer)


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
    import json

    return json.dumps(obj, default=str)


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER_KEY].stats())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def index(request: web.Request) -> web.StreamResponse:
    page = WEB_DIR / "index.html"
    if not page.exists():
        return _text(404, "the demo page is not installed")
    return web.FileResponse(page)


def make_app(server: TransceiverServer) -> web.Application:
    app = web.Application(client_max_size=MAX_OFFER * 2)
    app[SERVER_KEY] = server
    app.router.add_post("/v1/sessions", post_session)
    app.router.add_delete("/v1/sessions/{id}", delete_session)
    app.router.add_get("/v1/sessions/{id}", get_session)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    if WEB_DIR.is_dir():
        app.router.add_static("/static/", WEB_DIR)
    return app


class Transceiver:
    """UDP endpoint + HTTP signaling of one transceiver process."""

    def __init__(self, config: TransceiverConfig) -> None:
        self.config = config
        self.server = TransceiverServer(config, load_keys(config.secret_path))
        self._runner: web.AppRunner | None = None
        self.http_addr: tuple[str, int] = config.http

    async def start(self) -> None:
        await self.server.start()
        self._runner = web.AppRunner(make_app(self.server), access_log=None)
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
