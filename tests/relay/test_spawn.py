"""Waiting for a launcher in another process: the one-line reasons when it does not answer."""

from __future__ import annotations

import time

import pytest

from voicerelay.config import ConfigError
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.spawn import wait_until_answering


@pytest.fixture
def config(tmp_path) -> RelayConfig:
    return RelayConfig(listen_port=40001, state_dir=tmp_path, workers=1)  # nothing answers


def test_a_launcher_that_exits_first_is_its_last_log_line(config):
    config.log_file.write_text(
        "2026-01-01 00:00:00,000 voicerelay.launcher INFO created secret x\n"
        "relayctl: listen address 127.0.0.1:40001 is in use (Address in use): choose another\n\n"
    )
    stopped = []
    with pytest.raises(ConfigError) as caught:
        wait_until_answering(config, lambda: 2, lambda: stopped.append(1), timeout=5)
    assert str(caught.value) == (
        "relay failed to start: listen address 127.0.0.1:40001 is in use (Address in use): "
        "choose another"
    )
    assert stopped == []  # an exited launcher is not stopped again


def test_a_launcher_that_exits_without_a_word_gives_its_exit_code(config):
    config.log_file.write_text("")
    with pytest.raises(ConfigError, match="^relay failed to start: exit code 1$"):
        wait_until_answering(config, lambda: 1, lambda: None, timeout=5)


def test_a_launcher_that_never_answers_is_stopped_at_the_deadline(config):
    stopped = []
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"did not come up within 0 s: see {config.log_file}"):
        wait_until_answering(config, lambda: None, lambda: stopped.append(1), timeout=0.2)
    assert stopped == [1]
    assert 0.2 <= time.monotonic() - started < 2
