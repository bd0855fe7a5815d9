"""`relayctl up`: the README's run command, driven like a newcomer would."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import urllib.request

import psutil

from tests.support.procs import RELAYCTL, free_ports
from voicerelay.cli.call_client import place_call


def test_up_serves_the_page_answers_a_call_and_stops_clean_on_ctrl_c(up_stack):
    out = up_stack.output.read_text()
    assert f"open http://127.0.0.1:{up_stack.http_port}/" in out and "Ctrl-C" in out
    with urllib.request.urlopen(up_stack.url + "/") as page:
        assert b"Talk" in page.read()
    report = asyncio.run(place_call(up_stack.url, 600.0, seconds=1.5))
    assert report.tone_came_back, report
    children = psutil.Process(up_stack.proc.pid).children(recursive=True)
    assert len(children) >= 3  # launcher + 2 workers
    assert up_stack.interrupt() == 0
    psutil.wait_procs(children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert not any(
        n.startswith(f"voicerelay-{up_stack.public_port}-") for n in os.listdir("/dev/shm")
    )
    assert "voicerelay stopped" in up_stack.output.read_text()


def test_relayctl_call_reports_the_tone_came_back(up_stack):
    result = subprocess.run(
        [*RELAYCTL, "call", up_stack.url, "--tone", "880", "--seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tone 880 Hz came back" in result.stdout


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
    assert "--http-port" in result.stderr and "Traceback" not in result.stderr
