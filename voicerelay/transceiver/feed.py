"""One call's conversation events for pages (docs/VOICE.md): a bounded backlog, live subscribers.

Sans-IO apart from asyncio queues: times are passed in, nothing here reads a clock. The
publisher never waits: a subscriber that falls `subscriber_queue` events behind is dropped
(its stream ends after what it already has) and counted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

_END = None  # queued after a subscription's last event


class EventFeed:
    """One call's conversation events for pages: a bounded backlog and live subscribers."""

    def __init__(self, created: float, *, backlog: int = 256, subscriber_queue: int = 256) -> None:
        if backlog < 0 or subscriber_queue < 1:
            raise ValueError("backlog must be >= 0 and subscriber_queue >= 1")
        self.created = created
        self.closed = False
        self.dropped_subscribers = 0
        self.ignored_after_close = 0  # publish() calls that came after close()
        self._backlog: deque[dict[str, Any]] = deque(maxlen=backlog)
        self._limit = subscriber_queue
        # Unbounded queues; `_limit` is enforced here so the end marker always fits.
        self._subscribers: list[asyncio.Queue[dict[str, Any] | None]] = []
        self._last_now = created
        self._ended_published = False

    @property
    def subscribers(self) -> int:
        """Live subscriptions right now."""
        return len(self._subscribers)

    def publish(self, type: str, now: float, **fields: Any) -> None:
        """Record an event and hand it to every subscriber (no running loop needed)."""
        if self.closed:
            self.ignored_after_close += 1
            return
        event = {"type": type, "at_ms": round((now - self.created) * 1000), **fields}
        self._last_now = max(self._last_now, now)
        if type == "call.ended":
            self._ended_published = True
        self._backlog.append(event)
        for queue in list(self._subscribers):
            if queue.qsize() >= self._limit:
                self._drop(queue)
            else:
                queue.put_nowait(event)

    def close(self, now: float | None = None, reason: str | None = None) -> None:
        """Publish `call.ended` (if `reason` is given and none was published yet), then end every
        subscription after what is already queued. Idempotent. Without `now`, the event carries
        the time of the latest event."""
        if self.closed:
            return
        if reason is not None and not self._ended_published:
            self.publish("call.ended", self._last_now if now is None else now, reason=reason)
        self.closed = True
        for queue in self._subscribers:
            queue.put_nowait(_END)
        self._subscribers.clear()

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """The backlog, then live events; ends when the feed closes (or this subscriber is
        dropped for falling behind). Close it (`aclose`) if you stop reading early."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        backlog = list(self._backlog)
        live = not self.closed
        if live:
            self._subscribers.append(queue)
        try:
            for event in backlog:
                yield event
            while live and (event := await queue.get()) is not _END:
                yield event
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    def _drop(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.remove(queue)
        self.dropped_subscribers += 1
        queue.put_nowait(_END)
