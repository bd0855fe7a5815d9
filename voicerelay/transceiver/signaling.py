"""WHIP-style signaling (RFC 9725) and the demo page, over aiohttp.

POST   /v1/sessions        application/sdp offer -> 201, the answer, Location, ETag;
                           503 + Retry-After when full or draining (after SIGTERM)
DELETE /v1/sessions/{id}   end the session -> 204
PATCH  /v1/sessions/{id}   405: no trickle ICE nor ICE restart (RFC 9725 4.3.1)
GET    /v1/sessions/{id}   that session's stats (JSON)
GET    /v1/sessions/{id}/events   its conversation events (Server-Sent Events, docs/VOICE.md)
POST   /v1/client_tokens   (API key) a short-lived token for a browser: {"value", "expires_at"}
GET    /v1/stats           the transceiver's counters (JSON; the API key when auth is on)
OPTIONS /v1/...            CORS preflight (allowed origins only)
GET    /healthz            200 "ok" while the process runs
GET    /readyz             200 "ok", or 503 "draining" / "full" (docs/OPERATIONS.md)
GET    /metrics            Prometheus text format (docs/OPERATIONS.md)
GET    /                   the demo page (voicerelay/transceiver/web/), its files under /static/
GET    /favicon.ico        the page's icon (SVG)

Who may call what (API key, client tokens), the per-client rate limit on new sessions, the
offer caps and CORS are docs/SIGNALING.md; the decisions are pure code in `auth.py`,
`ratelimit.py` and `sdp.py`, this module only applies them. Every refusal is one line of text
with its status and is counted by reason (`/v1/stats` -> "signaling"), unknown paths and
methods included; a request aiohttp cannot parse is one short log line at most
(`HttpErrorLog`), never a traceback. With a certificate (`TransceiverConfig.tls_cert`) all of it
is served over HTTPS (`voicerelay/tls.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from voicerelay.addresses import format_addr
from voicerelay.metrics import metrics_response, probe_response
from voicerelay.transceiver.auth import (
    API_KEY_CALLER,
    Access,
    AuthError,
    Caller,
    CorsPolicy,
    load_or_create_api_key,
    token_lifetime,
)
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.feed import EventFeed
from voicerelay.transceiver.ratelimit import (
    DEFAULT_BURST,
    DEFAULT_RATE,
    RateLimiter,
    client_key,
    retry_after_header,
)
from voicerelay.transceiver.sdp import MAX_OFFER, SdpError
from voicerelay.transceiver.server import Draining, SessionLimit, TransceiverServer
from voicerelay.wire.token import load_keys

log = logging.getLogger("voicerelay.signaling")
HTTP_LOG = logging.getLogger("voicerelay.signaling.http")  # what aiohttp's server logs
WEB_DIR = Path(__file__).with_name("web")
SERVER_KEY = web.AppKey("server", TransceiverServer)
KEEPALIVE_S = 15.0  # a comment line on an event stream after this much quiet
KEEPALIVE_KEY = web.AppKey("events_keepalive", float)
STREAMS_KEY = web.AppKey("event_streams", set[asyncio.Event])  # one stop signal per open stream
BODY_TIMEOUT_S = 5.0  # an offer must arrive this soon after its headers
MAX_JSON_BODY = 1024  # POST /v1/client_tokens
LINGER_S = 2.0  # after an early answer, how long an unread request body is drained
FULL_RETRY_AFTER = "5"  # seconds, when the transceiver has no room for another session
DRAIN_RETRY_AFTER = "1"  # seconds, when it is draining (another replica takes the call)
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a proxy in front must not hold events back
}
KEEPALIVE_LINE = b": keepalive\n\n"
AUTH_META = '<meta name="voicerelay-auth" content="off">'  # the page learns whether to send a token


@dataclass(frozen=True)
class SignalingPolicy:
    """Who may call signaling and how often: `api_key` None turns authentication off."""

    api_key: str | None = None
    session_rate: float = DEFAULT_RATE  # new sessions a second per client; 0: no limit
    session_burst: int = DEFAULT_BURST
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: TransceiverConfig, api_key: str | None) -> SignalingPolicy:
        return cls(api_key, config.session_rate, config.session_burst, config.cors_origins)


class Refused(Exception):
    """A request answered with one line of text: `status`, counter `reason`, `headers`."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class Guard:
    """One app's access state: the policy's access rules, rate limiter, CORS allow-list, and
    the counters of what signaling refused."""

    def __init__(self, policy: SignalingPolicy, body_timeout: float = BODY_TIMEOUT_S) -> None:
        self.access = Access(policy.api_key)
        self.limiter = RateLimiter(policy.session_rate, policy.session_burst)
        self.cors = CorsPolicy(policy.cors_origins)
        self.body_timeout = body_timeout
        self.counters: Counter[str] = Counter()

    def caller(self, request: web.Request, query_token: bool = False) -> Caller:
        """Who sent `request` (AuthError for a wrong credential)."""
        token = request.query.get("token") if query_token else None
        return self.access.caller(request.headers.get("Authorization"), token)

    def limit(self, request: web.Request) -> None:
        """Take one token from the client's bucket (once per request); Refused(429) if empty."""
        if request.get(CHARGED_KEY):
            return
        request[CHARGED_KEY] = True
        wait = self.limiter.take(client_key(request.remote), time.monotonic())
        if wait > 0:
            raise Refused(
                429,
                "rate_limited",
                "too many requests from your address: retry later",
                {"Retry-After": retry_after_header(wait)},
            )

    def stats(self) -> dict[str, Any]:
        """For /v1/stats: what was placed, minted and refused (by reason), table sizes."""
        return {
            "auth": self.access.enabled,
            "counters": dict(self.counters),
            "rate_limit_clients": len(self.limiter),
            "tokens_spent": len(self.access.used),
            "token_grants": self.access.grants,
        }


GUARD_KEY = web.AppKey("guard", Guard)
CHARGED_KEY = web.RequestKey("rate_limit_charged", bool)  # this request took from its bucket


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


# Sessions ---------------------------------------------------------------------------------------
INGRESS_HEADER = "X-Voicerelay-Ingress"  # names the edge ingress the answer advertises


async def post_session(request: web.Request) -> web.Response:
    """Place a call: the API key, a client token (spent by this call) or, with authentication
    off, anyone; all but the API key take from their address's rate-limit bucket first."""
    guard, server = request.app[GUARD_KEY], request.app[SERVER_KEY]
    if server.draining:
        raise _draining()
    caller = guard.caller(request)
    if caller is not API_KEY_CALLER:
        guard.limit(request)
    guard.access.may_create(caller, time.time())
    offer = await read_offer(request, guard.body_timeout)
    now = time.time()
    guard.access.may_create(caller, now)  # again: the token may have been spent meanwhile
    try:
        ingress = server.config.advertised(request.headers.get(INGRESS_HEADER))
        call_id, answer = server.create_session(offer, ingress)
    except SdpError as exc:
        raise Refused(400, "bad_offer", f"bad offer: {exc}") from None
    except Draining:
        raise _draining() from None
    except SessionLimit as exc:
        raise Refused(503, "full", str(exc), {"Retry-After": FULL_RETRY_AFTER}) from None
    guard.access.claim(caller, now)
    guard.access.grant(call_id, caller, lambda c: server.feed(c) is not None)
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": f"/v1/sessions/{call_id}", "ETag": f'"{call_id}"'},
    )


def _draining() -> Refused:
    return Refused(
        503,
        "draining",
        "this transceiver is draining: place the call on another one",
        {"Retry-After": DRAIN_RETRY_AFTER},
    )


async def read_offer(request: web.Request, timeout: float) -> str:
    """The request's SDP body: application/sdp, at most MAX_OFFER bytes, arrived within
    `timeout` seconds of its headers (Refused otherwise)."""
    if request.content_type != "application/sdp":
        raise Refused(415, "bad_content_type", "send the offer with Content-Type: application/sdp")
    if request.content_length is not None and request.content_length > MAX_OFFER:
        raise Refused(413, "too_large", f"offer larger than {MAX_OFFER} bytes")
    try:
        async with asyncio.timeout(timeout):
            body = await _read_at_most(request, MAX_OFFER)
    except TimeoutError:
        raise Refused(
            408, "body_timeout", f"the offer did not arrive within {timeout:g} s"
        ) from None
    except HttpProcessingError:
        raise Refused(400, "bad_body", "the request body is malformed") from None
    if body is None:
        raise Refused(413, "too_large", f"offer larger than {MAX_OFFER} bytes")
    return body.decode("utf-8", "replace")


async def _read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is longer than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def _authorized_call_id(request: web.Request, *, query_token: bool = False) -> str:
    """The call id of a session route, once its caller may use that call (AuthError if not)."""
    guard = request.app[GUARD_KEY]
    call_id = request.match_info["id"]
    guard.access.may_use(guard.caller(request, query_token), call_id)
    return call_id


async def delete_session(request: web.Request) -> web.Response:
    call_id = _authorized_call_id(request)
    if request.app[SERVER_KEY].delete_session(call_id):
        request.app[GUARD_KEY].access.forget(call_id)
        return web.Response(status=204)
    return _text(404, "no such session")


async def get_session(request: web.Request) -> web.Response:
    stats = request.app[SERVER_KEY].session_stats(_authorized_call_id(request))
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
    """The session's conversation events as they happen, backlog first. A browser's
    EventSource cannot send headers: its client token may come as `?token=`."""
    feed: EventFeed | None = request.app[SERVER_KEY].feed(
        _authorized_call_id(request, query_token=True)
    )
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
    guard = request.app[GUARD_KEY]
    guard.access.require_api_key(guard.caller(request))
    return web.json_response(
        {**request.app[SERVER_KEY].stats(), "signaling": guard.stats()}, dumps=_dumps
    )


# Client tokens ----------------------------------------------------------------------------------
async def post_client_token(request: web.Request) -> web.Response:
    """(API key) A client token for a browser: optional JSON body {"expires_in": seconds}."""
    guard = request.app[GUARD_KEY]
    access = guard.access
    if access.tokens is None:
        raise Refused(404, "auth_off", "authentication is off here: calls need no client token")
    access.require_api_key(guard.caller(request))
    lifetime = token_lifetime((await _json_body(request)).get("expires_in"))
    token = access.tokens.mint(time.time(), lifetime)
    guard.counters["tokens_minted"] += 1
    return web.json_response(
        {"value": token.value, "expires_at": token.expires_at},
        headers={"Cache-Control": "no-store"},
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    """A small JSON object body ({} when there is none); Refused(400) otherwise."""
    if not request.body_exists:
        return {}
    try:
        async with asyncio.timeout(request.app[GUARD_KEY].body_timeout):
            raw = await _read_at_most(request, MAX_JSON_BODY)
    except (TimeoutError, HttpProcessingError):
        raw = None
    if raw is not None and not raw.strip():
        return {}
    try:
        body = json.loads(raw) if raw is not None else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Refused(400, "bad_request", 'send a JSON object such as {"expires_in": 60}')
    return body


# Page -------------------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 while new sessions are taken; 503 with why (draining, full) otherwise."""
    why = request.app[SERVER_KEY].not_ready()
    return probe_response(why is None, why or "")


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text format (docs/OPERATIONS.md lists the metrics)."""
    return await metrics_response(request.app[SERVER_KEY].registry)


async def index(request: web.Request) -> web.StreamResponse:
    """The demo page, told whether signaling wants a client token."""
    page = WEB_DIR / "index.html"
    if not page.exists():
        return _text(404, "the demo page is not installed")
    html = page.read_text()
    if request.app[GUARD_KEY].access.enabled:
        html = html.replace(AUTH_META, AUTH_META.replace('"off"', '"required"'))
    return web.Response(text=html, content_type="text/html")


async def favicon(request: web.Request) -> web.StreamResponse:
    icon = WEB_DIR / "favicon.svg"
    if not icon.exists():
        return _text(404, "no icon installed")
    return web.FileResponse(icon, headers={"Content-Type": "image/svg+xml"})


# Refusals, CORS, bad HTTP -----------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS preflights, and every refusal as one line of text, counted by reason. A refused
    credential takes from the client's rate-limit bucket (no guessing at full speed)."""
    guard = request.app[GUARD_KEY]
    if request.method == "OPTIONS" and request.path.startswith("/v1/"):
        return preflight(request)
    try:
        return await handler(request)
    except AuthError as exc:
        refusal = Refused(exc.status, exc.reason, str(exc))
        if exc.status == 401:
            refusal.headers["WWW-Authenticate"] = "Bearer"
        try:
            guard.limit(request)
        except Refused as limited:
            refusal = limited
    except Refused as exc:
        refusal = exc
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        refusal = unrouted(request, exc)
    guard.counters[refusal.reason] += 1
    return _text(refusal.status, str(refusal), refusal.headers)


def unrouted(request: web.Request, exc: web.HTTPException) -> Refused:
    """A request no route takes, as a one-line refusal: 404, or 405 naming what is allowed
    (a PATCH of a session: this endpoint does neither trickle ICE nor ICE restarts)."""
    if not isinstance(exc, web.HTTPMethodNotAllowed):
        return Refused(404, "not_found", f"nothing at {request.path[:100]}: see docs/SIGNALING.md")
    allowed = ", ".join(sorted(exc.allowed_methods))
    headers = {"Allow": allowed}
    if request.method == "PATCH" and request.path.startswith("/v1/sessions/"):
        message = (
            "PATCH is not supported: no trickle ICE or ICE restart here; "
            "send every candidate in the offer"
        )
    else:
        message = f"{request.method[:16]} is not allowed on {request.path[:100]}: use {allowed}"
    return Refused(405, "method_not_allowed", message, headers)


def preflight(request: web.Request) -> web.Response:
    """An OPTIONS request: the CORS headers for an allowed origin, 403 for another origin."""
    guard = request.app[GUARD_KEY]
    origin = request.headers.get("Origin")
    if origin is None:
        return web.Response(status=204, headers={"Allow": "GET, POST, DELETE, OPTIONS"})
    headers = guard.cors.preflight(origin)
    if headers is None:
        guard.counters["cors_refused"] += 1
        return _text(403, f"origin {origin[:100]} may not call this signaling (see --cors-origin)")
    return web.Response(status=204, headers=headers)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An allowed origin may read the response (and its Location, ETag, Retry-After)."""
    if "Access-Control-Allow-Origin" in response.headers:
        return  # a preflight answer: complete already
    headers = request.app[GUARD_KEY].cors.response_headers(request.headers.get("Origin"))
    response.headers.update(headers)


class LineThrottle:
    """At most one line per `interval` seconds (pure: `now` is given); `admit` returns how
    many were held back since the last line admitted, or None to hold this one back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = -math.inf
        self._held = 0

    def admit(self, now: float) -> int | None:
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval
        held, self._held = self._held, 0
        return held


def bad_http_line(peer: object, exc: HttpProcessingError, held: int = 0) -> str:
    """One short line about a request aiohttp could not parse."""
    first = (exc.message or type(exc).__name__).strip().splitlines()[0].rstrip(":")
    reason = "".join(c if c.isprintable() else "?" for c in first)[:80]
    line = f"bad HTTP from {str(peer)[:46]}: {reason} ({exc.code})"
    return line + (f"; {held} more since the last such line" if held else "")


class HttpErrorLog(logging.LoggerAdapter):
    """aiohttp's server logger for one app: a request it cannot parse (bad chunks, TLS or
    random bytes on the port, a bad request line) is counted as `bad_http` and logged as one
    INFO line, at most one a second; everything else (a bug's traceback) passes unchanged."""

    def __init__(self, counters: Counter[str], interval: float = 1.0) -> None:
        super().__init__(HTTP_LOG, {})
        self.counters = counters
        self.throttle = LineThrottle(interval)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = _exception(kwargs.get("exc_info"))
        if not isinstance(exc, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        self.counters["bad_http"] += 1
        held = self.throttle.admit(time.monotonic())
        if held is not None:
            self.logger.info("%s", bad_http_line(args[0] if args else "?", exc, held))


def _exception(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None


# The app ----------------------------------------------------------------------------------------
def make_app(
    server: TransceiverServer,
    *,
    keepalive: float = KEEPALIVE_S,
    policy: SignalingPolicy | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
) -> web.Application:
    """The signaling routes and the demo page for `server`, guarded by `policy` (default:
    authentication off, the default rate limit, no cross-origin access)."""
    app = web.Application(client_max_size=MAX_OFFER * 2, middlewares=[guarded])
    app[SERVER_KEY] = server
    app[GUARD_KEY] = Guard(policy or SignalingPolicy(), body_timeout)
    app[KEEPALIVE_KEY] = keepalive
    app[STREAMS_KEY] = set()
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(_cors_headers)
    app.router.add_post("/v1/sessions", post_session)
    app.router.add_delete("/v1/sessions/{id}", delete_session)
    app.router.add_get("/v1/sessions/{id}", get_session)
    app.router.add_get("/v1/sessions/{id}/events", get_events)
    app.router.add_post("/v1/client_tokens", post_client_token)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    if WEB_DIR.is_dir():
        app.router.add_static("/static/", WEB_DIR)
    return app


def make_runner(server: TransceiverServer, **app_options: Any) -> web.AppRunner:
    """The app in a runner that cancels a handler whose client went away (an event stream
    then ends at once, not at its next keepalive), with aiohttp's errors quieted
    (`HttpErrorLog`) and an unread body drained for at most LINGER_S."""
    app = make_app(server, **app_options)
    return web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        logger=HttpErrorLog(app[GUARD_KEY].counters),
        lingering_time=LINGER_S,
    )


@dataclass(frozen=True)
class ApiKey:
    """Signaling's API key and where it came from (`path` None: given by option/env)."""

    value: str | None  # None: authentication is off
    path: Path | None = None
    created: bool = False

    def describe(self) -> str:
        """One line for the operator."""
        if self.value is None:
            return "auth: off (signaling on loopback; --require-auth turns it on)"
        if self.path is None:
            return "auth: on, with the API key from --api-key / VOICERELAY_API_KEY"
        made = "created now" if self.created else "kept"
        return f"auth: on, API key in {self.path} ({made}); `relayctl token` mints a client token"


def resolve_api_key(config: TransceiverConfig) -> ApiKey:
    """The API key signaling uses: None when auth is off, the given key, else the key file in
    the state directory (created 0600 on first use). ConfigError (one line) if unusable."""
    if not config.auth_enabled:
        return ApiKey(None)
    if config.api_key is not None:
        return ApiKey(config.api_key)
    value, created = load_or_create_api_key(config.api_key_path)
    return ApiKey(value, config.api_key_path, created)


def tls_context(config: TransceiverConfig) -> ssl.SSLContext | None:
    """The HTTPS server context of the configured certificate and key; None for plain HTTP.
    ConfigError (one line) if they cannot be used."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    from voicerelay.tls import server_context

    return server_context(config.tls_cert, config.tls_key)


class Transceiver:
    """UDP endpoint + HTTP(S) signaling of one transceiver process."""

    def __init__(self, config: TransceiverConfig) -> None:
        self.config = config
        self.ssl_context = tls_context(config)  # a bad certificate fails here, in one line
        self.api_key = resolve_api_key(config)
        self.server = TransceiverServer(config, load_keys(config.secret_path))
        self._runner: web.AppRunner | None = None
        self.http_addr: tuple[str, int] = config.http

    @property
    def url(self) -> str:
        """Where signaling and the page are: `http(s)://host:port` (IPv6 in brackets)."""
        host, port = self.http_addr[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        await self.server.start()
        policy = SignalingPolicy.from_config(self.config, self.api_key.value)
        self._runner = make_runner(self.server, policy=policy)
        await self._runner.setup()
        site = web.TCPSite(self._runner, *self.config.http, ssl_context=self.ssl_context)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.http_addr = sockets[0].getsockname()[:2]
        log.info(
            "transceiver up: internal %s:%d, signaling %s/, answers name relay %s; %s",
            *self.server.internal_addr,
            self.url,
            ", ".join(format_addr(a) for a in self.config.relay_public),
            self.api_key.describe(),
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
