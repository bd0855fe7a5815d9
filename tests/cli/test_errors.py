"""`relayctl` mistakes a person makes: one line on stderr naming the fix, exit 2, no traceback.

(`relayctl start` options are covered next to the relay: tests/relay/test_relay_processes.py.)
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.procs import RELAYCTL


def run(args: list[str], tmp_path, env: dict[str, str] | None = None):
    return subprocess.run(
        [*RELAYCTL, *args],
        env={**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path / "state"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "fix"),
    [
        # transceiver: examples use the option's own default port
        (
            ["transceiver", "--http", "nope"],
            {},
            "--http 'nope' is not HOST:PORT: write e.g. 127.0.0.1:8080",
        ),
        (["transceiver", "--internal", "nope"], {}, "write e.g. 127.0.0.1:5000"),
        (
            ["transceiver", "--relay-public", "127.0.0.1:x"],
            {},
            "no numeric port: write e.g. 127.0.0.1:3478",
        ),
        (
            ["transceiver", "--http", "example.com:80"],
            {},
            "--http host 'example.com' is not an IP address",
        ),
        (["transceiver", "--consent-timeout", "0"], {}, "consent timeout 0.0 is out of range"),
        (["transceiver"], {"VOICERELAY_HTTP": "8080"}, "(value from VOICERELAY_HTTP)"),
        (
            ["transceiver", "--secret-file", "/nonexistent/secret.key"],
            {},
            "point --secret-file at the relay's secret",
        ),
        (["transceiver", "--secret-file", "{tmp}/bad.key"], {}, "bad.key:1: expected '<key id"),
        # files a relay needs
        (["start", "--secret-file", "{tmp}/bad.key"], {}, "bad.key:1: expected '<key id"),
        (["start", "--state-dir", "{tmp}/a-file"], {}, "choose a writable directory"),
        (["up", "--state-dir", "{tmp}/a-file"], {}, "choose a writable directory"),
        # up
        (["up", "--host", "localhost"], {}, "--bind 'localhost' is not an IP address"),
        # up: bind and advertise (nothing is started: the check comes first)
        (["up", "--bind", "0.0.0.0"], {}, "list the addresses clients reach with --advertise"),
        (["up", "--advertise", "::"], {}, "--advertise :: is a wildcard"),
        (["up", "--advertise", "224.0.0.1"], {}, "--advertise 224.0.0.1 is not a unicast"),
        (["up", "--advertise", "fe80::1"], {}, "--advertise fe80::1 is link-local"),
        (["up", "--advertise", "nope"], {}, "--advertise 'nope' is not an IP address"),
        (
            ["up", "--advertise", "10.77.0.1"],
            {},
            "--advertise 10.77.0.1 cannot reach the relay bound to loopback 127.0.0.1",
        ),
        (["up", "--bind", "127.0.0.1", "--advertise", "::1"], {}, "the relay binds IPv4"),
        (
            ["up", "--relay-bind", "::"],
            {},
            "the relay binds the wildcard ::, which answers cannot name",
        ),
        (["up"], {"VOICERELAY_ADVERTISE": "0.0.0.0"}, "(value from VOICERELAY_ADVERTISE)"),
        (["up", "--cert", "{tmp}/a-file"], {}, "--cert and --key go together"),
        (
            ["up", "--cert", "{tmp}/a-file", "--key", "{tmp}/a-file"],
            {},
            "cannot be used",
        ),
        (
            ["transceiver", "--relay-public", "127.0.0.1:3478,0.0.0.0:3478"],
            {},
            "--relay-public 0.0.0.0 is a wildcard",
        ),
        (["call", "--local-address", "0.0.0.0"], {}, "--local-address"),
        (["up", "--public-port", "0"], {}, "--public-port 0 is out of range: use 1-65535"),
        (["up", "--workers", "0"], {}, "workers 0 is out of range: use 1-256"),
        (["up"], {"VOICERELAY_HTTP_PORT": "99999"}, "--http-port 99999 is out of range"),
        # call
        (["call", "--tone", "5"], {}, "--tone: use 20-20000 Hz"),
        (["call", "127.0.0.1:8080"], {}, "write e.g. http://127.0.0.1:8080"),
        # anything
        (["stat"], {}, "No such command 'stat'"),
        (["start", "--listen-port", "1"], {}, "No such option"),
    ],
)
def test_a_wrong_option_is_one_line_naming_the_fix(tmp_path, args, env, fix):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad.key").write_text("0 nothex\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run(args, tmp_path, env)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert fix in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("verb", ["stats", "status", "stop"])
def test_asking_a_relay_that_is_not_running_says_so(tmp_path, verb):
    result = run([verb, "--listen", "127.0.0.1:1"], tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "no relay runs on port 1" in lines[0]
