"""A minimal aiortc echo server speaking voicerelay's signaling: the program a user who picks
aiortc would write, and the peer bench/peer_aiortc.py measures the transceiver against.

POST   /v1/sessions        application/sdp offer -> 201, the answer, Location
GET    /v1/sessions/{id}   {"rtp_in", "rtp_out", "state"}: aiortc's own RTP statistics
DELETE /v1/sessions/{id}   close the call -> 204
GET    /v1/stats           {"sessions": open calls, "created", "closed", "refused"}
GET    /healthz            200 "ok"

Each call is one RTCPeerConnection whose received audio track is added back as its sending
track: aiortc decodes the Opus it receives (jitter buffer, decoder thread) and encodes it again
to send it, which is how aiortc echoes. ICE gathers 127.0.0.1 only and uses no STUN server; a
call ends when the client hangs up (DTLS close_notify: connection state closed) or ICE fails.
One process, one event loop (uvloop, as the transceiver runs; `--asyncio` for the default loop).

    .venv/bin/python bench/aiortc_echo_server.py [--listen 127.0.0.1:8790] [--asyncio]

prints `aiortc echo server ready: http://HOST:PORT` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

from aiohttp import web

MAX_OFFER = 64 * 1024
ENDED_STATES = ("closed", "failed")


def rtp_counts(report: Iterable[Any]) -> dict[str, int]:
    """RTP packets received and sent, summed over a call's aiortc statistics entries."""
    counts = {"rtp_in": 0, "rtp_out": 0}
    for entry in report:
        kind = getattr(entry, "type", None)
        if kind == "inbound-rtp":
            counts["rtp_in"] += int(getattr(entry, "packetsReceived", 0) or 0)
        elif kind == "outbound-rtp":
            counts["rtp_out"] += int(getattr(entry, "packetsSent", 0) or 0)
    return counts


def loopback_only_ice() -> None:
    """Make aioice gather 127.0.0.1 only (it skips loopback by default)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]


class EchoServer:
    """The calls and their HTTP routes."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}  # id -> RTCPeerConnection
        self.counters: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER * 2)
        app.router.add_post("/v1/sessions", self.post_session)
        app.router.add_get("/v1/sessions/{id}", self.get_session)
        app.router.add_delete("/v1/sessions/{id}", self.delete_session)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/healthz", self.healthz)
        app.on_shutdown.append(self.close_all)
        return app

    async def post_session(self, request: web.Request) -> web.Response:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        if request.content_type != "application/sdp":
            return web.Response(status=415, text="send the offer as application/sdp\n")
        body = await request.content.read(MAX_OFFER + 1)
        if len(body) > MAX_OFFER:
            return web.Response(status=413, text=f"offer larger than {MAX_OFFER} bytes\n")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        call_id = os.urandom(8).hex()

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                pc.addTrack(track)  # echo: what arrives is decoded, encoded again and sent

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ENDED_STATES:
                await self._end(call_id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(body.decode(), "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - a bad offer is the client's error, counted
            self.counters["refused"] += 1
            await pc.close()
            return web.Response(status=400, text=f"bad offer: {exc}\n")
        self.calls[call_id] = pc
        self.counters["created"] += 1
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/v1/sessions/{call_id}"},
        )

    async def get_session(self, request: web.Request) -> web.Response:
        pc = self.calls.get(request.match_info["id"])
        if pc is None:
            return web.Response(status=404, text="no such session\n")
        report = await pc.getStats()
        return web.json_response({**rtp_counts(report.values()), "state": pc.connectionState})

    async def delete_session(self, request: web.Request) -> web.Response:
        if not await self._end(request.match_info["id"]):
            return web.Response(status=404, text="no such session\n")
        return web.Response(status=204)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": len(self.calls), **self.counters})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _end(self, call_id: str) -> bool:
        pc = self.calls.pop(call_id, None)
        if pc is None:
            return False
        self.counters["closed"] += 1
        await pc.close()
        return True

    async def close_all(self, app: web.Application | None = None) -> None:
        for call_id in list(self.calls):
            await self._end(call_id)


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8790)")
    return host, int(port)


async def serve(listen: tuple[str, int]) -> None:
    server = EchoServer()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, *listen)
    await site.start()
    host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiortc echo server ready: http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8790))
    parser.add_argument("--asyncio", action="store_true", help="the default loop, not uvloop")
    args = parser.parse_args()
    loopback_only_ice()
    if args.asyncio:
        asyncio.run(serve(args.listen))
    else:
        import uvloop

        uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
