"""Signaling's authentication: the API key, client tokens (pure properties, then over HTTP
against a real transceiver on loopback), when it is on, the key file, the demo page's hint."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.procs import RELAYCTL, free_ports, wait_for
from tests.transceiver.test_sdp_rtp import CHROME_OFFER
from tests.transceiver.test_signaling_abuse import in_a_thread, serving
from voicerelay.config import ConfigError
from voicerelay.transceiver.auth import (
    API_KEY_CALLER,
    TOKEN_PREFIX,
    Access,
    AuthError,
    ClientTokens,
    UsedTokens,
    load_or_create_api_key,
    read_api_key,
)
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.signaling import SignalingPolicy, resolve_api_key
from voicerelay.wire.token import write_new_secret

KEY = "test-api-key-0123456789"
NOW = 1_800_000_000.0
SDP = {"Content-Type": "application/sdp"}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


# Client tokens, pure ----------------------------------------------------------------------------
@given(
    st.floats(0, 4e9, allow_nan=False),
    st.integers(1, 600),
    st.binary(min_size=12, max_size=12),
)
def test_a_token_opens_to_what_was_minted(now, lifetime, nonce):
    tokens = ClientTokens(KEY)
    token = tokens.mint(now, lifetime, nonce)
    assert token.value.startswith(TOKEN_PREFIX) and len(token.value) <= 64
    assert now + lifetime <= token.expires_at < now + lifetime + 1
    assert tokens.open(token.value) == token


@given(st.data())
def test_any_change_to_a_token_is_refused(data):
    token = ClientTokens(KEY).mint(NOW).value
    i = data.draw(st.integers(len(TOKEN_PREFIX), len(token) - 1), label="position")
    c = data.draw(st.sampled_from("ABCDEFabcdef0123456789-_"), label="character")
    changed = token[:i] + c + token[i + 1 :]
    if changed != token:
        with pytest.raises(AuthError) as refused:
            ClientTokens(KEY).open(changed)
        assert refused.value.status == 401


@given(st.text(max_size=80))
def test_opening_anything_raises_only_auth_error(text):
    with pytest.raises(AuthError):
        ClientTokens(KEY).open(text)
    with pytest.raises(AuthError):
        ClientTokens(KEY).open(TOKEN_PREFIX + text)


def test_a_token_from_another_api_key_is_refused():
    token = ClientTokens("another-api-key-0123456789").mint(NOW)
    with pytest.raises(AuthError, match="not minted with this API key"):
        ClientTokens(KEY).open(token.value)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 5)), max_size=60))
def test_used_tokens_refuse_a_second_use_until_expiry_and_stay_bounded(uses):
    """Tokens (by index) claimed at rising times: a token is accepted once, then refused while
    it has not expired; memory never exceeds the capacity."""
    tokens = ClientTokens(KEY)
    minted = [tokens.mint(NOW, 10, bytes([i]) * 12) for i in range(31)]
    used, now, first_use = UsedTokens(capacity=64), NOW, {}
    for index, dt in uses:
        now += dt
        granted = used.claim(minted[index], now)
        if index in first_use and minted[index].expires_at >= now:
            assert not granted
        if granted:
            first_use[index] = now
        assert len(used) <= 64


def test_a_full_used_set_forgets_the_token_closest_to_expiry():
    tokens = ClientTokens(KEY)
    used = UsedTokens(capacity=2)
    soon, later, latest = (tokens.mint(NOW, s) for s in (10, 20, 30))
    assert used.claim(later, NOW) and used.claim(soon, NOW) and used.claim(latest, NOW)
    assert len(used) == 2 and soon not in used and later in used and latest in used


def test_access_rules_without_the_network():
    access = Access(KEY)
    token = access.tokens.mint(NOW, 60)
    caller = access.caller(f"Bearer {token.value}")
    assert access.caller(f"bearer   {KEY} ") is API_KEY_CALLER
    access.may_create(caller, NOW)
    access.claim(caller, NOW)
    access.grant("c1", caller, live=lambda _: True)
    with pytest.raises(AuthError, match="already used"):
        access.may_create(caller, NOW + 1)
    access.may_use(caller, "c1")
    access.may_use(caller, "c1")  # expiry does not end a call's key...
    later = access.caller(None, token.value)  # ...also as ?token= (EventSource)
    access.may_use(later, "c1")
    with pytest.raises(AuthError) as other:
        access.may_use(caller, "c2")
    assert other.value.status == 403
    stale = access.caller(f"Bearer {access.tokens.mint(NOW - 120, 60).value}")
    with pytest.raises(AuthError, match="expired"):
        access.may_create(stale, NOW)
    for header in ("Basic abc", "Bearer", "Bearer wrong-key-0123456789", "Token " + KEY):
        with pytest.raises(AuthError) as refused:
            access.caller(header)
        assert refused.value.status == 401
    with pytest.raises(AuthError) as forbidden:
        access.require_api_key(caller)
    assert forbidden.value.status == 403


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["place", "use"]), st.integers(0, 5), st.integers(0, 9))))
def test_a_token_places_at_most_one_call_and_opens_only_that_one(actions):
    """Random attempts by six tokens to place calls (each a new call id, as the server makes
    them) and to use the calls so far: each token places at most one call, and only the
    token that placed a call may use it."""
    access = Access(KEY)
    callers = [access.caller(f"Bearer {access.tokens.mint(NOW, 600).value}") for _ in range(6)]
    placed_by: list[int] = []  # call i was placed by token placed_by[i]
    for action, who, pick in actions:
        caller = callers[who]
        if action == "place":
            try:
                access.may_create(caller, NOW)
            except AuthError:
                assert who in placed_by
                continue
            assert who not in placed_by
            access.claim(caller, NOW)
            access.grant(f"c{len(placed_by)}", caller, live=lambda _: True)
            placed_by.append(who)
        elif placed_by:
            call = pick % len(placed_by)
            try:
                access.may_use(caller, f"c{call}")
                assert placed_by[call] == who
            except AuthError:
                assert placed_by[call] != who


def test_grants_of_ended_calls_are_pruned():
    access = Access(KEY)
    live: set[str] = set()
    for i in range(5000):
        caller = access.caller(f"Bearer {access.tokens.mint(NOW).value}")
        access.grant(f"c{i}", caller, live=lambda c: c in live)
        live.add(f"c{i}")
        live.discard(f"c{i - 10}")  # ten calls at a time
    assert access.grants <= 1024 + 10


def test_authentication_off_lets_everyone_in():
    access = Access(None)
    assert access.caller("Bearer whatever") == access.caller(None)
    access.may_create(access.caller(None), NOW)
    access.may_use(access.caller(None), "anything")
    access.require_api_key(access.caller(None))


# When authentication is on, and the key file ------------------------------------------------------
@pytest.mark.parametrize(
    ("http", "options", "on"),
    [
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("127.0.0.1", {"require_auth": True}, True),
        ("127.0.0.1", {"api_key": KEY}, True),
        ("0.0.0.0", {}, True),
        ("::", {}, True),
        ("10.1.2.3", {}, True),
    ],
)
def test_authentication_is_on_whenever_signaling_listens_beyond_loopback(http, options, on):
    assert TransceiverConfig(http=(http, 8080), **options).auth_enabled is on


def test_the_key_file_is_created_0600_on_first_use_and_kept(tmp_path):
    config = TransceiverConfig(http=("0.0.0.0", 8080), state_dir=tmp_path / "state")
    first = resolve_api_key(config)
    assert first.created and first.path == tmp_path / "state" / "api.key"
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.path.parent.stat().st_mode) == 0o700
    again = resolve_api_key(config)
    assert again.value == first.value and not again.created
    assert str(first.path) in first.describe()
    assert resolve_api_key(TransceiverConfig(state_dir=tmp_path / "other")).value is None
    assert not (tmp_path / "other").exists()  # auth off on loopback: no key file made
    given_key = resolve_api_key(TransceiverConfig(api_key=KEY, state_dir=tmp_path / "x"))
    assert given_key.value == KEY and given_key.path is None


@pytest.mark.parametrize(
    ("content", "mode", "says"),
    [
        (b"vrk_" + b"a" * 40, 0o644, "chmod 600"),
        (b"short", 0o600, "16-256"),
        (b"\xff\xfe" * 20, 0o600, "cannot read"),
    ],
)
def test_a_bad_key_file_is_one_line_naming_the_fix(tmp_path, content, mode, says):
    path = tmp_path / "api.key"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=says) as error:
        load_or_create_api_key(path)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="no API key file"):
        read_api_key(tmp_path / "missing.key")


@pytest.mark.parametrize("key", ["short", "has space in the key 0123", "é" * 20])
def test_a_bad_api_key_option_is_one_line(key):
    with pytest.raises(ConfigError, match="--api-key"):
        TransceiverConfig(api_key=key)


# Over HTTP ---------------------------------------------------------------------------------------
async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, str, dict[str, str]]:
    async with http.request(method, url, **kwargs) as r:
        return r.status, await r.text(), dict(r.headers)


async def stream_status(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    """The status of a GET whose body may never end (an event stream)."""
    async with http.get(url, **kwargs) as r:
        return r.status


def run_authenticated(scenario, **policy: Any) -> Any:
    """`scenario(url, http)` against a transceiver whose signaling wants the API key KEY."""

    async def body() -> Any:
        async with (
            serving(policy=SignalingPolicy(api_key=KEY, **policy)) as stack,
            aiohttp.ClientSession() as http,
        ):
            return await scenario(stack.url, http)

    return asyncio.run(body())


def test_without_the_api_key_or_a_token_nothing_but_the_page_answers():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        status, text, headers = await call(
            http, "POST", url + "/v1/sessions", data=CHROME_OFFER, headers=SDP
        )
        assert (status, headers.get("WWW-Authenticate")) == (401, "Bearer"), text
        assert text == "send Authorization: Bearer <API key or client token>\n"
        wrong = bearer("not-the-api-key-0123456789")
        assert (await call(http, "POST", url + "/v1/sessions", data="v=0", headers=wrong))[0] == 401
        assert (await call(http, "GET", url + "/v1/stats"))[0] == 401
        assert (await call(http, "POST", url + "/v1/client_tokens"))[0] == 401
        assert (await call(http, "GET", url + "/healthz"))[0] == 200
        status, page, _ = await call(http, "GET", url + "/")
        assert status == 200 and '<meta name="voicerelay-auth" content="required">' in page

    run_authenticated(scenario)


def test_the_api_key_places_calls_and_reads_stats_without_a_rate_limit():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        key = bearer(KEY)
        for _ in range(5):  # the burst is 2: the API key is not limited
            status, _, headers = await call(
                http, "POST", url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, **key}
            )
            assert status == 201
        location = url + headers["Location"]
        assert (await call(http, "GET", location, headers=key))[0] == 200
        assert await stream_status(http, location + "/events", headers=key) == 200
        assert (await call(http, "DELETE", location, headers=key))[0] == 204
        status, text, _ = await call(http, "GET", url + "/v1/stats", headers=key)
        assert status == 200 and '"signaling"' in text and '"sessions_created": 5' in text

    run_authenticated(scenario, session_rate=0.1, session_burst=2)


def test_a_client_token_places_one_call_and_keeps_the_key_to_it():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        status, _, headers = await call(
            http, "POST", url + "/v1/client_tokens", headers=bearer(KEY)
        )
        assert status == 200 and headers["Cache-Control"] == "no-store"
        async with http.post(url + "/v1/client_tokens", headers=bearer(KEY)) as r:
            minted = await r.json()
        assert set(minted) == {"value", "expires_at"}
        assert time.time() + 58 < minted["expires_at"] <= time.time() + 61  # 60 s by default
        token = bearer(minted["value"])
        refused = await call(
            http, "POST", url + "/v1/sessions", data="v=0", headers={**SDP, **token}
        )
        assert refused[0] == 400  # a refused offer does not spend the token
        status, answer, headers = await call(
            http, "POST", url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, **token}
        )
        assert status == 201 and answer.startswith("v=0")
        location = url + headers["Location"]
        again = await call(
            http, "POST", url + "/v1/sessions", data=CHROME_OFFER, headers={**SDP, **token}
        )
        assert again[:2] == (401, "client token already used: mint a new one\n")
        assert (await call(http, "GET", location, headers=token))[0] == 200
        events = f"{location}/events?token={minted['value']}"
        assert await stream_status(http, events) == 200  # how an EventSource sends its token
        assert await stream_status(http, location + "/events") == 401
        # what a client token may not do
        assert (await call(http, "GET", url + "/v1/stats", headers=token))[0] == 403
        assert (await call(http, "POST", url + "/v1/client_tokens", headers=token))[0] == 403
        async with http.post(url + "/v1/client_tokens", headers=bearer(KEY)) as r:
            other = bearer((await r.json())["value"])
        assert (await call(http, "DELETE", location, headers=other))[0] == 403
        assert (await call(http, "DELETE", location))[0] == 401
        assert (await call(http, "DELETE", location, headers=token))[0] == 204

    run_authenticated(scenario)


def test_expired_forged_and_out_of_range_tokens_are_refused():
    async def scenario(url: str, http: aiohttp.ClientSession) -> None:
        expired = ClientTokens(KEY).mint(time.time() - 120, 60).value
        forged = ClientTokens("some-other-key-0123456789").mint(time.time()).value
        for token, says in ((expired, "expired"), (forged, "not minted with this API key")):
            status, text, _ = await call(
                http,
                "POST",
                url + "/v1/sessions",
                data=CHROME_OFFER,
                headers={**SDP, **bearer(token)},
            )
            assert status == 401 and says in text, text
        mint = url + "/v1/client_tokens"
        async with http.post(mint, json={"expires_in": 600}, headers=bearer(KEY)) as r:
            assert (await r.json())["expires_at"] >= time.time() + 599
        for body in ({"expires_in": 601}, {"expires_in": 0}, {"expires_in": "60"}, [1]):
            status, text, _ = await call(http, "POST", mint, json=body, headers=bearer(KEY))
            assert status == 400 and text.count("\n") == 1, (body, text)
        status, _, _ = await call(http, "POST", mint, data=b"{nope", headers=bearer(KEY))
        assert status == 400

    run_authenticated(scenario)


def test_guessing_credentials_runs_into_the_rate_limit():
    async def scenario(url: str, http: aiohttp.ClientSession) -> list[int]:
        guesses = [bearer(f"guess-{i:04d}-0123456789") for i in range(12)]
        return [(await call(http, "GET", url + "/v1/stats", headers=g))[0] for g in guesses]

    statuses = run_authenticated(scenario, session_rate=0.01, session_burst=5)
    assert statuses == [401] * 5 + [429] * 7


def test_with_authentication_off_there_are_no_client_tokens():
    async def body() -> tuple[int, str]:
        async with serving() as stack, aiohttp.ClientSession() as http:
            status, text, _ = await call(http, "POST", stack.url + "/v1/client_tokens")
            page = (await call(http, "GET", stack.url + "/"))[1]
            assert 'content="off"' in page
            return status, text

    status, text = asyncio.run(body())
    assert status == 404 and "authentication is off" in text


def test_rate_limited_answers_say_when_to_retry():
    async def body() -> list[tuple[int, str | None]]:
        policy = SignalingPolicy(session_rate=0.5, session_burst=1)
        async with serving(policy=policy) as stack, aiohttp.ClientSession() as http:
            out = []
            for _ in range(2):
                status, _, headers = await call(
                    http, "POST", stack.url + "/v1/sessions", data=CHROME_OFFER, headers=SDP
                )
                out.append((status, headers.get("Retry-After")))
            return out

    assert asyncio.run(body()) == [(201, None), (429, "2")]


def test_the_key_file_is_what_relayctl_token_reads(tmp_path):
    path = tmp_path / "api.key"
    key, created = load_or_create_api_key(path)
    assert created and read_api_key(path) == key and os.stat(path).st_mode & 0o077 == 0


# The command line: `relayctl transceiver --require-auth` and `relayctl token` ------------------
def test_relayctl_transceiver_keeps_a_key_file_and_relayctl_token_mints_from_it(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    write_new_secret(state / "secret.key")
    port = free_ports(1, socket.SOCK_STREAM)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(state)}
    env.pop("VOICERELAY_API_KEY", None)
    out = tmp_path / "transceiver.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [*RELAYCTL, "transceiver", "--require-auth", "--http", f"127.0.0.1:{port}"]
            + ["--internal", "127.0.0.1:0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: b"transceiver ready" in out.read_bytes(), 15, 0.05, "the transceiver")
        ready = [ln for ln in out.read_text().splitlines() if "transceiver ready" in ln][0]
        assert f"API key in {state / 'api.key'} (created now)" in ready
        assert stat.S_IMODE((state / "api.key").stat().st_mode) == 0o600

        def relayctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*RELAYCTL, "token", url, *args], env=env, capture_output=True, text=True
            )

        minted = relayctl()
        assert minted.returncode == 0 and minted.stdout.startswith("vrct_"), minted
        token = minted.stdout.strip()
        page = relayctl("--page", "--expires-in", "600")
        assert page.stdout.strip().startswith(f"{url}/#token=vrct_")
        refused = relayctl("--api-key", "not-the-key-0123456789")
        assert refused.returncode == 1
        assert refused.stderr.strip() == "Error: signaling refused: HTTP 401 wrong API key"
        bad = relayctl("--expires-in", "601")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr

        def post(headers: dict[str, str]) -> int:
            request = urllib.request.Request(
                url + "/v1/sessions", CHROME_OFFER.encode(), {**SDP, **headers}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post({}) == 401
        assert post(bearer(token)) == 201
        assert post(bearer(token)) == 401  # single use
    finally:
        proc.terminate()
        proc.wait(10)


def test_relayctl_token_without_a_key_is_one_line(tmp_path):
    result = subprocess.run(
        [*RELAYCTL, "token", "--state-dir", str(tmp_path)],
        env={k: v for k, v in os.environ.items() if k != "VOICERELAY_API_KEY"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("relayctl: no API key file") and result.stderr.count("\n") == 1


# The demo page ----------------------------------------------------------------------------------
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


@pytest.mark.browser
def test_the_demo_page_says_how_to_get_a_token_and_calls_with_one(browser_page):
    page = browser_page
    with in_a_thread(lambda: serving(policy=SignalingPolicy(api_key=KEY))) as stack:
        page.goto(stack.url + "/")
        assert page.is_visible("#auth-needed") and page.is_disabled("#talk")
        assert "relayctl token --page" in page.inner_text("#auth-needed")

        token = ClientTokens(KEY).mint(time.time()).value
        page.goto(f"{stack.url}/?connect_timeout=30#token={token}")
        assert page.evaluate("location.hash") == ""  # the token left the address bar
        assert page.is_hidden("#auth-needed") and page.is_enabled("#talk")
        page.click("#talk")
        page.wait_for_function("() => window.voicerelay.location !== null", timeout=10000)
        assert stack.server.stats()["counters"]["sessions_created"] == 1
        page.click("#hangup")  # DELETE with the token
        wait_for(lambda: not stack.server.calls, 5, 0.02, "the call to be deleted")
        assert stack.server.stats()["closed"] == {"deleted": 1}

        page.click("#talk")  # the token is spent: the page says so, and how to get another
        page.wait_for_selector("#auth-needed", state="visible", timeout=10000)
        assert "client token already used" in page.inner_text("#error")
