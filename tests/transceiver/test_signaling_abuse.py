"""Signaling as an attacker uses it, against a real TransceiverServer and its aiohttp app on
loopback ports: a POST flood, a huge offer, protocol garbage. Each test failed on the code before
the limits (issue 11) and passes with them."""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transceiver.test_sdp_rtp import CHROME_OFFER
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.ratelimit import RateLimiter, client_key
from voicerelay.transceiver.server import TransceiverServer
from voicerelay.transceiver.signaling import LineThrottle, make_runner
from voicerelay.wire.token import TokenKeys

CERTIFICATE = Certificate.generate()
T = TypeVar("T")
FLOOD_HOST, HONEST_HOSTS = "127.0.0.2", ("127.0.0.3", "127.0.0.4", "127.0.0.5")


@dataclass
class Stack:
    url: str
    port: int
    server: TransceiverServer
    runner: web.AppRunner


@asynccontextmanager
async def serving(max_sessions: int = 2000, **app_options: Any) -> AsyncIterator[Stack]:
    """A real transceiver (UDP endpoint and signaling) on free loopback ports."""
    config = TransceiverConfig(internal=("127.0.0.1", 0), max_sessions=max_sessions)
    server = TransceiverServer(config, TokenKeys({0: os.urandom(32)}, 0), CERTIFICATE)
    await server.start()
    runner = make_runner(server, **app_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Stack(f"http://127.0.0.1:{port}", port, server, runner)
    finally:
        server.close()
        await runner.cleanup()


@contextmanager
def in_a_thread(context: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enter `context()` in an event loop on a thread of its own (for Playwright's sync API and
    blocking clients); yields what it yields, exits it when done."""
    ready, stop = threading.Event(), threading.Event()
    entered: list[T] = []

    async def serve() -> None:
        async with context() as value:
            entered.append(value)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the servers did not start"
    try:
        yield entered[0]
    finally:
        stop.set()
        thread.join(10)


def raw_post(offer: str, path: str = "/v1/sessions") -> bytes:
    body = offer.encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def flood(port: int, requests: int, connections: int = 4) -> list[bytes]:
    """`requests` anonymous offers from FLOOD_HOST, pipelined on a few keep-alive connections
    (the client costs nothing); returns the status lines of every answer."""
    per_connection = requests // connections

    async def one() -> list[bytes]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(FLOOD_HOST, 0)
        )
        writer.write(raw_post(CHROME_OFFER) * per_connection)
        await writer.drain()
        statuses: list[bytes] = []
        async with asyncio.timeout(20):
            while len(statuses) < per_connection:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"HTTP/1.1 "):
                    statuses.append(line.split()[1])
        writer.close()
        return statuses

    results = await asyncio.gather(*(one() for _ in range(connections)))
    return [status for statuses in results for status in statuses]


async def honest_post(url: str, source: str) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(
            url + "/v1/sessions", data=CHROME_OFFER, headers={"Content-Type": "application/sdp"}
        ) as r,
    ):
        return r.status, await r.text()


# A POST flood -----------------------------------------------------------------------------------
def test_a_post_flood_from_one_client_leaves_room_for_honest_calls():
    async def body() -> tuple[list[bytes], list[int], list[int], int, float]:
        async with serving() as stack:
            started = time.monotonic()
            flooding = asyncio.ensure_future(flood(stack.port, 2000))
            during = [(await honest_post(stack.url, h))[0] for h in HONEST_HOSTS]
            statuses = await flooding
            elapsed = time.monotonic() - started
            after = [(await honest_post(stack.url, h))[0] for h in HONEST_HOSTS]
            return statuses, during, after, len(stack.server.calls), elapsed

    statuses, during, after, sessions, elapsed = asyncio.run(body())
    assert len(statuses) == 2000 and elapsed < 10
    assert during == [201] * 3 and after == [201] * 3  # honest callers never see 503
    created = statuses.count(b"201")
    assert created <= 20 + 2 * elapsed + 1  # the burst plus the refill, nothing more
    assert statuses.count(b"429") == 2000 - created
    assert sessions == created + 6


# A huge offer -------------------------------------------------------------------------------------
def test_an_offer_of_thousands_of_minimal_m_lines_is_refused_in_one_line():
    offer = CHROME_OFFER + "m=video 9 X 0\r\n" * 3900  # 60 KB: a 1 MB answer before the caps

    async def body() -> tuple[int, str, int]:
        async with (
            serving() as stack,
            aiohttp.ClientSession() as http,
            http.post(
                stack.url + "/v1/sessions", data=offer, headers={"Content-Type": "application/sdp"}
            ) as r,
        ):
            return r.status, await r.text(), len(stack.server.calls)

    status, text, sessions = asyncio.run(body())
    assert status in (400, 413) and text.count("\n") == 1 and len(text) < 120, (status, text)
    assert sessions == 0


# Protocol garbage ---------------------------------------------------------------------------------
CHUNKED_HEAD = (
    b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
GARBAGE = {
    "bad chunk size": [CHUNKED_HEAD + b"zz\r\nv=0\r\n0\r\n\r\n"],
    "bad chunk size after the headers": [CHUNKED_HEAD + b"5\r\nv=0\r\n\r\n", b"zz\r\nabc\r\n"],
    "TLS on the HTTP port": [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64)],
    "random bytes": [os.urandom(300)],
    "bad request line": [b"GET / HTTP/1.1 extra\r\n\r\n"],
    "header without colon": [b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"],
    "huge header": [b"GET /healthz HTTP/1.1\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n"],
    "bad content length": [b"POST /v1/sessions HTTP/1.1\r\nContent-Length: -5\r\n\r\n"],
}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records():
    """Every record at INFO or above, whatever the logger (as `configure_logging` shows them)."""
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def send_raw(port: int, pieces: list[bytes]) -> bytes:
    """Send `pieces` (a short pause between them) on one connection; what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i, piece in enumerate(pieces):
        if i:
            await asyncio.sleep(0.05)  # the handler is reading the body by now
        writer.write(piece)
        await writer.drain()
    async with asyncio.timeout(5):
        reply = await reader.read(1000)
    writer.close()
    return reply


@pytest.mark.parametrize("pieces", GARBAGE.values(), ids=GARBAGE.keys())
def test_protocol_garbage_is_one_quiet_line(pieces, log_records):
    short_wait = {"body_timeout": 0.3} if len(pieces) > 1 else {}  # for a body cut short

    async def body() -> bytes:
        async with serving(**short_wait) as stack:
            reply = await send_raw(stack.port, pieces)
            # the same server still answers an honest request
            async with aiohttp.ClientSession() as http, http.get(stack.url + "/healthz") as r:
                assert r.status == 200
            return reply

    reply = asyncio.run(body())
    assert reply == b"" or reply.startswith(b"HTTP/1.") and b" 4" in reply[:13], reply[:80]
    lines = [r for r in log_records if r.name.startswith(("aiohttp", "voicerelay.signaling"))]
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    for record in lines:
        text = logging.Formatter().format(record)
        assert record.exc_info is None and "Traceback" not in text, text
        assert "\n" not in text and len(text) <= 160, text


def test_a_stream_of_garbage_is_counted_and_logs_about_a_line_a_second(log_records):
    async def body() -> dict[str, Any]:
        async with serving() as stack:
            for _ in range(30):
                await send_raw(stack.port, GARBAGE["bad chunk size"])
            async with (
                aiohttp.ClientSession() as http,
                http.get(stack.url + "/v1/stats") as r,
            ):
                return (await r.json())["signaling"]["counters"]

    started = time.monotonic()
    counters = asyncio.run(body())
    seconds = time.monotonic() - started
    assert counters["bad_http"] == 30
    lines = [r.getMessage() for r in log_records if r.name.startswith("voicerelay.signaling")]
    assert 1 <= len(lines) <= 1 + seconds, lines
    assert lines[0].startswith("bad HTTP from 127.0.0.1: Invalid character in chunk size")


# The pure parts: rate limit, client keys, log throttle -------------------------------------------
@settings(max_examples=200)
@given(
    st.floats(0.1, 50),
    st.integers(1, 30),
    st.lists(st.tuples(st.integers(0, 3), st.floats(0, 2)), max_size=200),
)
def test_no_client_gets_more_than_its_burst_plus_the_refill(rate, burst, requests):
    limiter = RateLimiter(rate, burst)
    now, granted = 0.0, {k: [] for k in range(4)}
    for key, dt in requests:
        now += dt
        wait = limiter.take(str(key), now)
        assert wait >= 0
        if wait == 0:
            granted[key].append(now)
        else:  # a refusal says how long until the next token: then one is there
            assert RateLimiter.take(copy.deepcopy(limiter), str(key), now + wait + 1e-9) == 0
    for times in granted.values():
        for i, start in enumerate(times):  # in any window [start, end]
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + (times[j] - start) * rate + 1e-6


def test_a_full_table_forgets_refilled_clients_before_a_drained_one():
    limiter = RateLimiter(0.001, 2, max_clients=8)
    assert limiter.take("drained", 0.0) == 0 and limiter.take("drained", 0.0) == 0  # oldest
    for i in range(7):
        limiter.take(f"idle-{i}", 1.0)  # full again (they hold nothing) by t=1500
    for i in range(3):
        limiter.take(f"new-{i}", 1500.0)  # past max_clients: the table shrinks
    assert len(limiter) <= 8
    assert limiter.take("drained", 1500.0) == 0  # 1.5 tokens: remembered, so...
    assert limiter.take("drained", 1500.0) > 0  # ...empty now (a forgotten one would have 2)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
    ],
)
def test_clients_are_ipv4_addresses_and_ipv6_slash_64s(host, key):
    assert client_key(host) == key


@given(st.floats(0.1, 5), st.lists(st.floats(0, 0.5), max_size=100))
def test_the_log_throttle_admits_a_line_per_interval_and_counts_the_rest(interval, gaps):
    throttle, now, admitted, held = LineThrottle(interval), 0.0, [], 0
    for gap in gaps:
        now += gap
        count = throttle.admit(now)
        if count is None:
            held += 1
        else:
            admitted.append(now)
            assert count == held  # what was held back since the last line
            held = 0
    for a, b in itertools.pairwise(admitted):
        assert b - a >= interval - 1e-9
