"""What every voicerelay process sets up for itself: its log format, and dying with its parent."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_PR_SET_PDEATHSIG = 1


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr in the one format every voicerelay process writes."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a worker, a `relayctl up` child)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
