"""`relayctl up` and `relayctl call`: the README's run command, driven like a newcomer would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import urllib.request
from pathlib import Path

import aiohttp
import psutil

from tests.e2e.conftest import UpStack
from tests.support.procs import RELAYCTL, free_ports
from voicerelay.cli.call_client import place_call


def test_up_serves_the_page_answers_a_call_and_stops_clean_on_ctrl_c(up_stack):
    out = up_stack.output.read_text()
    assert f"open http://127.0.0.1:{up_stack.http_port}/" in out  # where to open the page
    assert "Ctrl-C stops everything" in out  # and how to stop
    with urllib.request.urlopen(up_stack.url + "/") as page:
        assert b"Talk" in page.read()
    report = asyncio.run(place_call(up_stack.url, 600.0, seconds=1.5))
    assert report.tone_came_back and report.audio_seconds > 1.0, report
    children = psutil.Process(up_stack.proc.pid).children(recursive=True)
    assert len(children) >= 3  # launcher + 2 workers
    assert up_stack.ctrl_c() == 0  # SIGINT to the whole process group, as a terminal sends it
    psutil.wait_procs(children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert not any(
        n.startswith(f"voicerelay-{up_stack.public_port}-") for n in os.listdir("/dev/shm")
    )
    out = up_stack.output.read_text()
    assert out.rstrip().endswith("voicerelay stopped")
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    log = (up_stack.state_dir / f"relay-{up_stack.public_port}.log").read_text()
    assert f"relay on port {up_stack.public_port} stopped" in log
    assert tracebacks(log) == []


def tracebacks(log: str) -> list[str]:
    """The tracebacks in a log, each as one block of text."""
    blocks = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = block.splitlines()
        end = next((i for i, ln in enumerate(lines[1:], 1) if not ln.startswith(" ")), 0)
        blocks.append("\n".join(lines[: end + 1]))
    return blocks


def test_relayctl_call_reports_the_tone_came_back(up_stack):
    result = subprocess.run(
        [*RELAYCTL, "call", up_stack.url, "--tone", "880", "--seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert re.match(
        r"tone 880 Hz came back \(heard 880 Hz, \d+% of the echo\); setup \d+ ms", first
    )
    assert "s of audio back" in result.stdout


def test_relayctl_call_says_ice_failed_when_nothing_listens_at_the_relay_address(no_relay):
    result = subprocess.run(
        [*RELAYCTL, "call", no_relay.url, "--timeout", "2", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and not result.stderr, result.stdout + result.stderr
    relay = f"127.0.0.1:{no_relay.relay.port}"
    assert lines[0].startswith("call failed: ICE did not connect within 2 s"), lines[0]
    assert f"nothing answered at {relay} from 127.0.0.1" in lines[0]  # what was tried
    assert "is the relay running" in lines[0] and "--advertise" in lines[0]  # the fix


def test_relayctl_call_json_names_the_failed_step(no_relay):
    result = subprocess.run(
        [*RELAYCTL, "call", no_relay.url, "--timeout", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["step"] == "ICE"
    assert report["candidates"] == [["127.0.0.1", no_relay.relay.port]]
    assert report["local_addresses"] == ["127.0.0.1"]  # loopback for a loopback answer


def test_relayctl_call_says_when_signaling_is_unreachable():
    url = f"http://127.0.0.1:{free_ports(1, socket.SOCK_STREAM)}"
    result = subprocess.run(
        [*RELAYCTL, "call", url, "--timeout", "2"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith(f"call failed: signaling at {url} unreachable"), line
    assert line.endswith("is the stack running (relayctl up) and the address right?")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_refused_call_names_the_fix(tmp_path):
    stack = UpStack(tmp_path / "state", extra=["--require-auth"]).start()
    try:
        result = subprocess.run(
            [*RELAYCTL, "call", stack.url, "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stack.cleanup()
    assert result.returncode == 1
    assert result.stdout.startswith("call failed: signaling answered 401: "), result.stdout
    assert "pass a client token or the API key with --token" in result.stdout


# WHIP (RFC 9725) ---------------------------------------------------------------------------------
def test_whip_answers_location_etag_and_delete_and_refuses_patch(up_stack):
    async def exchange() -> dict:
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        offer = (await pc.createOffer()).sdp
        await pc.close()
        out: dict = {}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                up_stack.url + "/v1/sessions",
                data=offer,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                out["post"] = (r.status, r.content_type, r.headers.copy(), await r.text())
            session = up_stack.url + out["post"][2]["Location"]
            async with http.patch(
                session, data="a=end-of-candidates\r\n", headers={"Content-Type": SDPFRAG}
            ) as r:
                out["patch"] = (r.status, r.headers.get("Allow"), await r.text())
            async with http.delete(session) as r:
                out["delete"] = r.status
            async with http.delete(session) as r:
                out["again"] = (r.status, await r.text())
            async with http.get(up_stack.url + "/v1/nothing") as r:
                out["unknown"] = (r.status, await r.text())
        return out

    out = asyncio.run(exchange())
    status, content_type, headers, answer = out["post"]
    assert (status, content_type) == (201, "application/sdp") and answer.startswith("v=0")
    assert re.fullmatch(r"/v1/sessions/[0-9a-f]+", headers["Location"])
    assert re.fullmatch(r'"[0-9a-f]+"', headers["ETag"])  # a strong entity-tag
    status, allow, text = out["patch"]
    assert status == 405 and set(allow.split(", ")) >= {"DELETE", "GET"}
    assert text == "PATCH is not supported: no trickle ICE or ICE restart here; " + (
        "send every candidate in the offer\n"
    )
    assert out["delete"] == 204
    assert out["again"] == (404, "no such session\n")
    assert out["unknown"][0] == 404 and out["unknown"][1].count("\n") == 1  # one line


SDPFRAG = "application/trickle-ice-sdpfrag"


def test_a_busy_port_is_one_line_naming_the_option(tmp_path):
    http_port = free_ports(1, socket.SOCK_STREAM)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", http_port))
        squatter.listen()
        env = {**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)}
        result = subprocess.run(
            [
                *RELAYCTL,
                "up",
                "--http-port",
                str(http_port),
                "--public-port",
                str(free_ports(1)),
                "--internal-port-base",
                str(free_ports(4)),
                "--transceiver-port",
                str(free_ports(1)),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--http-port" in lines[0] and "in use" in lines[0], lines


def test_the_readme_run_command_is_relayctl_up_on_the_defaults_it_documents():
    """`make run` is `relayctl up` with no options; the README names its ports and URL."""
    root = Path(__file__).resolve().parents[2]
    readme, makefile = (root / "README.md").read_text(), (root / "Makefile").read_text()
    assert "make run" in readme
    run_recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert run_recipe.rstrip().endswith("$(VENV)/bin/relayctl up")
    from voicerelay.cli.stack_cmds import up

    defaults = {p.name: p.default for p in up.params}
    assert (defaults["public_port"], defaults["http_port"]) == (3478, 8080)
    # no address options: signaling on 127.0.0.1, the relay's UDP everywhere, answers listing
    # 127.0.0.1 and this host's addresses (tests/cli/test_addresses.py has the rules)
    assert (defaults["bind"], defaults["relay_bind"], defaults["advertise"]) == (None, None, ())
    assert "UDP 3478" in readme and "http://127.0.0.1:8080/" in readme
    assert ".venv/bin/relayctl call http://127.0.0.1:8080" in readme
