"""The values every `relayctl` verb parses: HOST:PORT and port numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicerelay.cli.options import check_port, parse_hostport
from voicerelay.config import ConfigError

hosts = st.ip_addresses().map(str)
ports = st.integers(1, 65535)


def written(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@given(hosts, ports)
def test_host_and_port_round_trip(host, port):
    assert parse_hostport(written(host, port), "--listen") == (host, port)


@given(hosts)
def test_a_bare_host_takes_the_default_port(host):
    text = f"[{host}]" if ":" in host else host
    assert parse_hostport(text, "--listen", 3478) == (host, 3478)


@given(st.text(max_size=30))
def test_anything_else_is_a_config_error_naming_the_option(text):
    try:
        parse_hostport(text, "--listen")
    except ConfigError as exc:
        assert str(exc).startswith("--listen ")


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("nope", "--http 'nope' is not HOST:PORT: write e.g. 127.0.0.1:8080 or [::1]:8080"),
        ("127.0.0.1:x", "--http '127.0.0.1:x' has no numeric port: write e.g. 127.0.0.1:8080"),
        ("example.com:80", "--http host 'example.com' is not an IP address"),
        ("127.0.0.1:0", "--http port 0 is out of range: use 1-65535"),
        ("127.0.0.1:65536", "--http port 65536 is out of range: use 1-65535"),
    ],
)
def test_mistakes_name_the_fix_with_the_options_own_port(text, fix):
    with pytest.raises(ConfigError) as caught:
        parse_hostport(text, "--http", example_port=8080)
    assert fix in str(caught.value)


def test_port_zero_is_allowed_where_asked_for():
    assert parse_hostport("127.0.0.1:0", "--http", min_port=0) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="--agent-port 0 is out of range: use 1-65535"):
        check_port(0, "--agent-port")
