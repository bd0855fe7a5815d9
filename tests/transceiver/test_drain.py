"""SIGTERM drains a real transceiver process: new sessions are refused at once (503 with
Retry-After, readyz 503), a call in progress keeps echoing through a real relay, and the
process exits 0 once that call ends, or once --drain-grace has passed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.support.procs import RelayProcess, TransceiverProcess
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import ClientCall

PAYLOAD = bytes(80)  # an Opus-sized frame; the echo app returns it as it came


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    with RelayProcess(tmp_path_factory.mktemp("drain"), workers=1) as proc:
        yield proc


async def until(predicate, timeout: float, what: str) -> None:
    """Poll an async predicate until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def echoes(call: ClientCall, packets: int = 5) -> bool:
    """Send `packets` frames; true once that many more came back."""
    before = call.rtp_received
    for n in range(packets):
        call.send_audio(PAYLOAD, n * 960)

    async def back() -> bool:
        return call.rtp_received >= before + packets

    await until(back, 5, "the echo")
    return True


async def status_of(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, dict]:
    async with http.request(method, url, data="v=0\r\n") as r:
        return r.status, dict(r.headers)


async def exited(proc, timeout: float) -> int:
    async def done() -> bool:
        return proc.poll() is not None

    await until(done, timeout, "the transceiver to exit")
    return proc.returncode


def test_sigterm_refuses_new_sessions_and_waits_for_the_call_in_progress(relay):
    with TransceiverProcess(relay, extra=["--drain-grace", "60"]) as tx:

        async def scenario() -> None:
            async with aiohttp.ClientSession() as http:
                call = ClientCall(Certificate.generate())
                await call.connect(http, tx.url)
                await asyncio.wait_for(call.secure, 5)
                assert await echoes(call)
                assert (await status_of(http, "GET", tx.url + "/readyz"))[0] == 200

                os.kill(tx.proc.pid, signal.SIGTERM)

                async def refusing() -> bool:
                    return (await status_of(http, "GET", tx.url + "/readyz"))[0] == 503

                await until(refusing, 2, "readyz 503")
                status, headers = await status_of(http, "POST", tx.url + "/v1/sessions")
                assert status == 503 and int(headers["Retry-After"]) >= 1
                async with http.get(tx.url + "/metrics") as r:
                    assert "voicerelay_transceiver_draining 1.0" in await r.text()

                assert await echoes(call)  # the call in progress goes on
                assert tx.proc.poll() is None
                assert await call.hang_up(http) == 204
                assert await exited(tx.proc, 5) == 0
                call.close()

        asyncio.run(scenario())


def test_the_drain_grace_ends_a_call_that_goes_on(relay):
    grace = 1.0
    with TransceiverProcess(relay, extra=["--drain-grace", str(grace)]) as tx:

        async def scenario() -> tuple[float, str]:
            async with aiohttp.ClientSession() as http:
                call = ClientCall(Certificate.generate())
                await call.connect(http, tx.url)
                await asyncio.wait_for(call.secure, 5)
                signalled = time.monotonic()
                os.kill(tx.proc.pid, signal.SIGTERM)
                assert await exited(tx.proc, grace + 5) == 0
                took = time.monotonic() - signalled
                reason = await asyncio.wait_for(call.closed, 5)  # told, not left to time out
                call.close()
                return took, reason

        took, reason = asyncio.run(scenario())
        assert took >= grace
        assert reason  # the server closed the call (DTLS close_notify)
