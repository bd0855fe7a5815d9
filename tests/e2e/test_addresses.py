"""Bind and advertise, IPv6, several candidates and HTTPS: `relayctl up` and `relayctl call` as
someone on another host, or on IPv6, would use them.

Every address here is loopback (127.0.0.1, ::1): tests never advertise or bind this machine's
interface addresses (the auto-detected default is tested as a pure function in
tests/cli/test_addresses.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import urllib.request

import aiohttp
import pytest

from tests.e2e.conftest import UpStack
from tests.support.procs import RELAYCTL, RelayProcess, TransceiverProcess, free_ports, wait_for
from voicerelay.cli.call_client import place_call
from voicerelay.transceiver import sdp
from voicerelay.transceiver.sdp import host_priority


def call(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RELAYCTL, "call", url, "--seconds", "1", "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class UpStackAt(UpStack):
    """`relayctl up` whose signaling is at `url` (IPv6, HTTPS)."""

    def __init__(self, state_dir, extra: list[str], host: str, scheme: str = "http") -> None:
        super().__init__(state_dir, extra=extra)
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{url_host}:{self.http_port}"

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"relayctl up exited: {self.output.read_text()}")
        unverified = ssl._create_unverified_context()  # readiness only; trust is tested below
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=0.5, context=unverified):
                return True
        except OSError:
            return False


@pytest.fixture
def ipv6_stack(tmp_path):
    stack = UpStackAt(tmp_path / "state", ["--bind", "::1", "--advertise", "::1"], "::1").start()
    yield stack
    stack.cleanup()


def test_relayctl_call_over_ipv6_the_command_up_prints(ipv6_stack):
    out = ipv6_stack.output.read_text()
    assert f"open http://[::1]:{ipv6_stack.http_port}/" in out
    assert f"answers advertise [::1]:{ipv6_stack.public_port}" in out
    assert f"try `relayctl call http://[::1]:{ipv6_stack.http_port}`" in out
    result = call(ipv6_stack.url, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["tone_came_back"], result.stdout + result.stderr
    assert report["candidates"] == [["::1", ipv6_stack.public_port]]
    assert report["local_addresses"] == ["::1"]  # gathered where the answer's candidate is
    human = call(ipv6_stack.url)
    assert human.returncode == 0 and human.stdout.startswith("tone 440 Hz came back")


@pytest.fixture(scope="module")
def two_candidates(tmp_path_factory):
    """A relay on 127.0.0.1 behind a transceiver whose answers list [::1] first (nothing
    listens there) and then 127.0.0.1."""
    with RelayProcess(tmp_path_factory.mktemp("two"), workers=1) as relay:
        dead = free_ports(1)
        public = f"[::1]:{dead},127.0.0.1:{relay.port}"
        with TransceiverProcess(relay, extra=["--relay-public", public]) as transceiver:
            yield relay, transceiver, dead


def test_answers_carry_every_advertised_candidate_in_order(two_candidates):
    relay, transceiver, dead = two_candidates

    async def post() -> str:
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        offer = (await pc.createOffer()).sdp
        await pc.close()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                transceiver.url + "/v1/sessions",
                data=offer,
                headers={"Content-Type": "application/sdp"},
            ) as r,
        ):
            assert r.status == 201
            return await r.text()

    answer = asyncio.run(post())
    lines = [ln for ln in answer.splitlines() if ln.startswith("a=candidate:")]
    assert lines == [
        f"a=candidate:1 1 udp {host_priority(0)} ::1 {dead} typ host",
        f"a=candidate:2 1 udp {host_priority(1)} 127.0.0.1 {relay.port} typ host",
    ]
    assert sdp.parse_answer(answer).candidates == [("::1", dead), ("127.0.0.1", relay.port)]


def test_a_call_connects_through_whichever_candidate_answers(two_candidates):
    relay, transceiver, _ = two_candidates
    report = asyncio.run(place_call(transceiver.url, 660.0, seconds=1.0))
    assert report.error is None and report.tone_came_back, report.error
    assert report.local_addresses == ["::1", "127.0.0.1"]  # one per candidate's family
    assert relay.stats()["totals"]["packets_in"] > 0  # through the relay on 127.0.0.1


def test_a_forced_local_address_that_cannot_reach_the_relay_is_an_ice_failure(two_candidates):
    _, transceiver, _ = two_candidates
    result = call(transceiver.url, "--local-address", "::1", "--timeout", "2")
    assert result.returncode == 1
    assert result.stdout.startswith("call failed: ICE did not connect within 2 s"), result.stdout
    assert "from ::1;" in result.stdout


# HTTPS -------------------------------------------------------------------------------------------
@pytest.fixture
def https_stack(tmp_path):
    extra = ["--https", "--bind", "127.0.0.1", "--advertise", "127.0.0.1"]
    stack = UpStackAt(tmp_path / "state", extra, "127.0.0.1", "https").start()
    yield stack
    stack.cleanup()


def _page(url: str, cafile: str | None) -> tuple[int, str]:
    async def get() -> tuple[int, str]:
        context = ssl.create_default_context(cafile=cafile)
        connector = aiohttp.TCPConnector(ssl=context)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(url + "/") as r,
        ):
            return r.status, await r.text()

    return asyncio.run(get())


def test_https_with_a_self_signed_certificate_made_on_first_use(https_stack):
    state = https_stack.state_dir
    cert, key = state / "https.crt", state / "https.key"
    out = https_stack.output.read_text()
    assert f"open https://127.0.0.1:{https_stack.http_port}/" in out
    assert f"self-signed certificate {cert} (made now;" in out
    assert f"try `relayctl call https://127.0.0.1:{https_stack.http_port} --cafile {cert}`" in out
    assert key.stat().st_mode & 0o777 == 0o600
    status, page = _page(https_stack.url, str(cert))  # a real client, trusting the certificate
    assert status == 200 and "Talk" in page
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        _page(https_stack.url, None)  # ... and one that does not
    report = asyncio.run(place_call(https_stack.url, 500.0, seconds=1.0, cafile=cert))
    assert report.error is None and report.tone_came_back, report.error
    untrusted = call(https_stack.url, "--timeout", "2")
    assert untrusted.returncode == 1
    assert "certificate is not trusted" in untrusted.stdout and "--cafile" in untrusted.stdout

    fingerprint = out.split("SHA-256 ", 1)[1].split(")", 1)[0]
    assert https_stack.ctrl_c() == 0
    again = UpStackAt(state, https_stack.extra, "127.0.0.1", "https").start()  # same state dir
    try:
        second = again.output.read_text()
        assert f"self-signed certificate {cert} (kept; SHA-256 {fingerprint})" in second
    finally:
        again.cleanup()


def test_https_with_the_users_certificate(tmp_path):
    from voicerelay.tls import ensure_self_signed

    (tmp_path / "mine").mkdir()
    own = ensure_self_signed(tmp_path / "mine", ["127.0.0.1"])  # stands in for a CA's pair
    extra = ["--cert", str(own.cert), "--key", str(own.key)]
    stack = UpStackAt(tmp_path / "state", extra, "127.0.0.1", "https").start()
    try:
        assert f"https: the certificate {own.cert}" in stack.output.read_text()
        assert _page(stack.url, str(own.cert))[0] == 200
        assert not (tmp_path / "state" / "https.crt").exists()  # nothing made
    finally:
        stack.cleanup()


# What `make run` sets up, on addresses this test makes ------------------------------------------
@pytest.fixture
def namespace_host():
    """A network namespace of this test's own (10.76.1.0/24, fd76:1::/64 on its veth): a
    machine whose only interface besides loopback is the test's."""
    from tests.support import netns

    why = netns.unavailable()
    if why:
        pytest.skip(why)
    with netns.ClientHost("10.76.1.0/24", "fd76:1::/64") as host:
        yield host


def test_the_default_shape_a_wildcard_relay_advertising_loopback_and_interfaces(
    tmp_path, namespace_host
):
    """What `relayctl up` does with no options (signaling on 127.0.0.1, the relay's UDP on
    `::`, answers listing 127.0.0.1 and the interface addresses), spelled out with explicit
    options inside a namespace, so the wildcard covers only the test's addresses. Calls
    from loopback and, as Firefox does (it never pairs loopback), from the interface's IPv4
    and IPv6 addresses all connect through the one dual-stack relay socket."""
    host = namespace_host
    v4, v6 = (host.client_address(f) for f in (socket.AF_INET, socket.AF_INET6))
    stack = UpStack(tmp_path / "state")
    args = [
        *RELAYCTL,
        "up",
        "--app",
        "echo",
        "--workers",
        "1",
        "--public-port",
        str(stack.public_port),
        "--internal-port-base",
        str(stack.internal_base),
        "--transceiver-port",
        str(stack.transceiver_port),
        "--http-port",
        str(stack.http_port),
        "--bind",
        "127.0.0.1",
        "--relay-bind",
        "::",
        "--advertise",
        f"127.0.0.1,{v4},{v6}",
    ]
    stack.state_dir.mkdir(parents=True)
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(stack.state_dir)}
    with open(stack.output, "wb") as out:
        stack.proc = host.popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"voicerelay is up" in stack.output.read_bytes(), 20, 0.05, "up")
        port = stack.public_port
        assert f"answers advertise 127.0.0.1:{port}, {v4}:{port}, [{v6}]:{port}" in (
            stack.output.read_text()
        )
        for local in (None, v4, v6):
            extra = ["--local-address", local] if local else []
            result = host.run(
                [*RELAYCTL, "call", stack.url, "--seconds", "1", "--json", *extra],
                capture_output=True,
                text=True,
                timeout=60,
            )
            report = json.loads(result.stdout)
            assert result.returncode == 0 and report["tone_came_back"], (local, result.stdout)
            assert report["local_addresses"] == ([local] if local else ["127.0.0.1", v4, v6])
    finally:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(20)
        finally:
            stack.cleanup()
