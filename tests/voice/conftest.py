"""Fixtures of the voice tests."""

from __future__ import annotations

import pytest

from tests.support.voice import unused_tcp_port


@pytest.fixture
def unused_port() -> int:
    return unused_tcp_port()
