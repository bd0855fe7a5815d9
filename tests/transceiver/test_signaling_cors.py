"""CORS: an allow-list of origins whose pages may call signaling. The headers over plain HTTP,
then a real Chromium page served from another origin (another port) placing a call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.transceiver.test_sdp_rtp import CHROME_OFFER
from tests.transceiver.test_signaling_abuse import Stack, in_a_thread, serving
from voicerelay.config import ConfigError
from voicerelay.transceiver.auth import ClientTokens, parse_origin, parse_origins
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.signaling import SignalingPolicy

APP = "https://app.example.com"
KEY = "cors-test-api-key-0123456789"
SDP = {"Content-Type": "application/sdp"}
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def cors_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


def run(scenario, **policy: Any) -> Any:
    async def body() -> Any:
        async with (
            serving(policy=SignalingPolicy(**policy)) as stack,
            aiohttp.ClientSession() as http,
        ):
            return await scenario(stack.url, http)

    return asyncio.run(body())


# Origins ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443/", "https://app.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_origins_are_written_as_browsers_send_them(text, origin):
    assert parse_origin(text) == origin


@pytest.mark.parametrize(
    "text", ["*", "app.example.com", "https://app.example.com/path", "ftp://x", "null", "https://"]
)
def test_what_is_not_an_origin_is_one_line_naming_the_option(text):
    with pytest.raises(ConfigError, match="--cors-origin .* is not an origin"):
        TransceiverConfig(cors_origins=(text,))


def test_origins_repeat_or_come_comma_separated():
    assert parse_origins(["https://a.example, https://b.example", "https://a.example"]) == (
        "https://a.example",
        "https://b.example",
    )


# Headers ----------------------------------------------------------------------------------------
def test_an_allowed_origin_gets_its_preflight_and_may_read_the_answer():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        origin = {"Origin": APP}
        async with http.options(url + "/v1/sessions", headers={**origin, **PREFLIGHT}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert {"GET", "POST", "DELETE"} <= set(
                r.headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")
            )
            allowed = r.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            assert r.headers["Vary"] == "Origin"
        async with http.post(
            url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, **origin}
        ) as r:
            assert r.status == 201
            assert r.headers["Access-Control-Allow-Origin"] == APP
            exposed = r.headers["Access-Control-Expose-Headers"].replace(" ", "").split(",")
            assert {"Location", "ETag"} <= set(exposed)
            location = r.headers["Location"]
        async with http.options(url + location, headers={**origin, **PREFLIGHT}) as r:
            assert r.status == 204  # DELETE of the session: preflighted too
        async with http.delete(url + location, headers=origin) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == APP

    run(scenario, cors_origins=(APP, "http://localhost:3000"))


def test_a_refusal_is_readable_by_an_allowed_origin():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        async with http.post(
            url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, "Origin": APP}
        ) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == APP

    run(scenario, cors_origins=(APP,), api_key=KEY)


@pytest.mark.parametrize("allowed", [(), (APP,)])
def test_other_origins_get_no_cors_headers(allowed):
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        evil = {"Origin": "https://evil.example"}
        async with http.options(url + "/v1/sessions", headers={**evil, **PREFLIGHT}) as r:
            assert r.status == 403 and cors_headers(r.headers) == {}
            assert "--cors-origin" in await r.text()
        async with http.post(url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, **evil}) as r:
            assert cors_headers(r.headers) == {}
        async with http.get(url + "/v1/stats", headers={"Origin": url}) as r:
            assert r.status == 200  # same origin, as the demo page calls it: works as before
            assert cors_headers(r.headers) == {}

    run(scenario, cors_origins=allowed)


# A real browser on another origin ---------------------------------------------------------------
PAGE = """<!doctype html><title>another app</title><script>
window.tryCall = async (signaling, offer, token) => {
  const auth = token ? {Authorization: "Bearer " + token} : {};
  try {
    const r = await fetch(signaling + "/v1/sessions", {
      method: "POST", headers: {"Content-Type": "application/sdp", ...auth}, body: offer});
    const out = {status: r.status, location: r.headers.get("Location"),
                 etag: r.headers.get("ETag"), answer: await r.text()};
    if (r.status === 201) {
      const d = await fetch(signaling + out.location, {method: "DELETE", headers: auth});
      out.deleted = d.status;
    }
    return out;
  } catch (err) {
    return {error: String(err)};
  }
};
</script>"""


def two_origins(**policy: Any) -> AbstractContextManager[tuple[Stack, str]]:
    """Signaling (a real transceiver) and a page server on another port; `cors_origins` may
    name the page's origin as "PAGE"."""

    @asynccontextmanager
    async def both() -> AsyncIterator[tuple[Stack, str]]:
        async def page(_: web.Request) -> web.Response:
            return web.Response(text=PAGE, content_type="text/html")

        page_app = web.Application()
        page_app.router.add_get("/", page)
        page_runner = web.AppRunner(page_app)
        await page_runner.setup()
        await web.TCPSite(page_runner, "127.0.0.1", 0).start()
        page_url = f"http://127.0.0.1:{page_runner.addresses[0][1]}"
        allowed = tuple(page_url if o == "PAGE" else o for o in policy.get("cors_origins", ()))
        try:
            options = {**policy, "cors_origins": allowed}
            async with serving(policy=SignalingPolicy(**options)) as stack:
                yield stack, page_url
        finally:
            await page_runner.cleanup()

    return in_a_thread(both)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_browser import CHROMIUM, FLAGS

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _try_call(page, stack: Stack, page_url: str, token: str | None = None) -> dict[str, Any]:
    page.goto(page_url)
    return page.evaluate(
        "([url, offer, token]) => window.tryCall(url, offer, token)",
        [stack.url, CHROME_OFFER, token],
    )


@pytest.mark.browser
def test_chromium_on_an_allowed_origin_places_and_ends_a_call(browser_page):
    with two_origins(cors_origins=("PAGE",), api_key=KEY) as (stack, page_url):
        token = ClientTokens(KEY).mint(time.time()).value
        result = _try_call(browser_page, stack, page_url, token)
        assert result.get("status") == 201, result
        assert result["location"].startswith("/v1/sessions/") and result["etag"]
        assert result["answer"].startswith("v=0") and result["deleted"] == 204
        assert stack.server.stats()["counters"]["sessions_created"] == 1


@pytest.mark.browser
@pytest.mark.parametrize("allowed", [(), ("https://app.example.com",)])
def test_chromium_on_another_origin_is_stopped_by_the_browser(browser_page, allowed):
    with two_origins(cors_origins=allowed) as (stack, page_url):
        result = _try_call(browser_page, stack, page_url)
        assert "Failed to fetch" in result.get("error", ""), result
        assert stack.server.calls == {}  # the preflight failed: the offer was never sent
