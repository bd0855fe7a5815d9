"""UDP sockets both sides bind: the kernel buffers they get, and a warning when it grants less."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from voicerelay.config import ConfigError
from voicerelay.net import bind_udp, check_port_free, granted_buffer


def sysctl(name: str) -> int:
    return int(Path("/proc/sys", *name.split(".")).read_text())


def test_a_buffer_within_the_kernel_limits_is_granted_without_a_word(caplog):
    wanted = min(sysctl("net.core.rmem_max"), sysctl("net.core.wmem_max"), 1 << 20) - 4096
    with caplog.at_level(logging.WARNING, "voicerelay.net"):
        sock = bind_udp("127.0.0.1", 0, reuse_port=False, buffer=wanted)
    with sock:
        assert granted_buffer(sock, socket.SO_RCVBUF) == wanted
        assert granted_buffer(sock, socket.SO_SNDBUF) == wanted
        assert not sock.getblocking()
    assert caplog.records == []


def test_a_capped_buffer_is_one_warning_naming_the_sysctl(caplog):
    """Ask for more than net.core.rmem_max / wmem_max allow: the kernel caps it silently; we
    say so once per process, naming what to raise."""
    rmem, wmem = sysctl("net.core.rmem_max"), sysctl("net.core.wmem_max")
    wanted = 2 * max(rmem, wmem) + 4096
    with caplog.at_level(logging.WARNING, "voicerelay.net"):
        for _ in range(3):
            with bind_udp("127.0.0.1", 0, reuse_port=False, buffer=wanted) as sock:
                assert granted_buffer(sock, socket.SO_RCVBUF) == rmem
                assert granted_buffer(sock, socket.SO_SNDBUF) == wmem
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # receive and send, once each
    assert f"capped at {rmem} bytes, not {wanted}" in lines[0]
    assert f"sysctl -w net.core.rmem_max={wanted}" in lines[0]
    assert f"sysctl -w net.core.wmem_max={wanted}" in lines[1]


@pytest.mark.parametrize("tcp", [False, True])
def test_a_port_someone_holds_is_a_one_line_error_naming_the_option(tcp):
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as squatter:
        squatter.bind(("127.0.0.1", 0))
        if tcp:
            squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port 127.0.0.1:{port} is in use .*--some-option"):
            check_port_free("127.0.0.1", port, "port", "--some-option", tcp=tcp)
    check_port_free("127.0.0.1", port, "port", "--some-option", tcp=tcp)  # free again
