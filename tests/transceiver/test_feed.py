"""EventFeed: one call's conversation events, a bounded backlog and live subscribers."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.transceiver.feed import EventFeed

T0 = 1000.0  # the session's creation time on the monotonic clock


async def settle() -> None:
    """Let every ready task run until it blocks (no clock involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def take(stream: Any, count: int) -> list[dict[str, Any]]:
    """`count` events that must already be available (fails rather than hangs)."""
    async with asyncio.timeout(2):
        return [await anext(stream) for _ in range(count)]


async def rest(stream: Any) -> list[dict[str, Any]]:
    """Everything up to the end of a stream that must end."""
    async with asyncio.timeout(2):
        return [event async for event in stream]


def test_an_event_carries_its_type_time_since_creation_and_fields():
    feed = EventFeed(T0)
    feed.publish("call.started", T0 + 0.0124)
    feed.publish("user.turn_ended", T0 + 1.2346, speech_ms=900)

    async def body() -> list[dict[str, Any]]:
        return await take(feed.subscribe(), 2)

    assert asyncio.run(body()) == [
        {"type": "call.started", "at_ms": 12},
        {"type": "user.turn_ended", "at_ms": 1235, "speech_ms": 900},
    ]


def test_a_subscriber_gets_the_backlog_then_live_events_in_order():
    async def body() -> None:
        feed = EventFeed(T0)
        feed.publish("call.started", T0 + 0.1)
        stream = feed.subscribe()
        assert [e["type"] for e in await take(stream, 1)] == ["call.started"]
        assert feed.subscribers == 1
        for i in range(5):
            feed.publish("agent.transcript", T0 + 1 + i, item_id="a", text=str(i), final=False)
        assert [e["text"] for e in await take(stream, 5)] == ["0", "1", "2", "3", "4"]
        reader = asyncio.create_task(take(stream, 1))
        await settle()
        assert not reader.done()  # nothing yet: it waits
        feed.publish("agent.done", T0 + 7, item_id="a", sent_ms=1200)
        assert (await reader)[0] == {
            "type": "agent.done",
            "at_ms": 7000,
            "item_id": "a",
            "sent_ms": 1200,
        }
        await stream.aclose()
        assert feed.subscribers == 0  # leaving early unsubscribes

    asyncio.run(body())


def test_a_late_subscriber_gets_only_the_bounded_backlog():
    feed = EventFeed(T0, backlog=3)
    for i in range(10):
        feed.publish("user.transcript", T0 + i, item_id=f"u{i}", text="hi")
    feed.close(T0 + 11, "hangup")

    async def body() -> list[dict[str, Any]]:
        return await rest(feed.subscribe())

    events = asyncio.run(body())
    assert [e.get("item_id", e["type"]) for e in events] == ["u8", "u9", "call.ended"]


def test_close_publishes_call_ended_once_then_ends_every_subscription():
    async def body() -> None:
        feed = EventFeed(T0)
        first, second = feed.subscribe(), feed.subscribe()
        readers = [asyncio.create_task(rest(s)) for s in (first, second)]
        await settle()
        feed.publish("user.speech_started", T0 + 1)
        feed.close(T0 + 2, "hangup")
        feed.close(T0 + 3, "again")  # idempotent: no second call.ended
        expected = [
            {"type": "user.speech_started", "at_ms": 1000},
            {"type": "call.ended", "at_ms": 2000, "reason": "hangup"},
        ]
        assert [await r for r in readers] == [expected, expected]
        assert feed.closed and feed.subscribers == 0
        assert await rest(feed.subscribe()) == expected  # after close: the backlog, then the end

    asyncio.run(body())


def test_close_does_not_repeat_a_published_call_ended_and_may_omit_it():
    feed = EventFeed(T0)
    feed.publish("call.ended", T0 + 1, reason="consent")
    feed.close(T0 + 2, "deleted")
    silent = EventFeed(T0)
    silent.publish("call.started", T0 + 1)
    silent.close()
    timed = EventFeed(T0)
    timed.publish("call.started", T0 + 4)
    timed.close(reason="server-stopped")  # no `now`: the time of the latest event

    async def body() -> list[list[dict[str, Any]]]:
        return [await rest(f.subscribe()) for f in (feed, silent, timed)]

    ended, quiet, late = asyncio.run(body())
    assert [e["reason"] for e in ended] == ["consent"]
    assert [e["type"] for e in quiet] == ["call.started"]
    assert late[-1] == {"type": "call.ended", "at_ms": 4000, "reason": "server-stopped"}


def test_publishing_after_close_is_ignored_and_counted():
    feed = EventFeed(T0)
    feed.close(T0 + 1, "hangup")
    feed.publish("agent.done", T0 + 2, item_id="a", sent_ms=0)
    assert feed.ignored_after_close == 1

    async def body() -> list[dict[str, Any]]:
        return await rest(feed.subscribe())

    assert [e["type"] for e in asyncio.run(body())] == ["call.ended"]


def test_a_slow_subscriber_is_dropped_and_the_publisher_never_waits():
    async def body() -> None:
        feed = EventFeed(T0, subscriber_queue=4)
        slow, fast = feed.subscribe(), feed.subscribe()
        fast_events: list[dict[str, Any]] = []

        async def read_fast() -> None:
            async for event in fast:
                fast_events.append(event)

        fast_reader = asyncio.create_task(read_fast())
        slow_first = asyncio.create_task(take(slow, 1))  # subscribed, then reads no more
        await settle()
        for i in range(20):  # synchronous: returns at once whatever the subscribers do
            feed.publish("agent.transcript", T0 + i, item_id="a", text=str(i), final=False)
            await settle()
        assert feed.dropped_subscribers == 1 and feed.subscribers == 1
        assert [e["text"] for e in fast_events] == [str(i) for i in range(20)]
        # The dropped subscriber keeps what it had queued (in order), then its stream ends.
        got = (await slow_first) + await rest(slow)
        assert [e["text"] for e in got] == [str(i) for i in range(5)]
        feed.close(T0 + 30, "hangup")
        await asyncio.wait_for(fast_reader, 2)
        assert fast_events[-1]["type"] == "call.ended"

    asyncio.run(body())


def test_publish_works_without_a_running_loop():
    feed = EventFeed(T0)
    feed.publish("call.started", T0 + 1)  # no loop exists at all
    loop = asyncio.new_event_loop()
    try:
        reader = loop.create_task(rest(feed.subscribe()))
        loop.run_until_complete(settle())  # the subscriber now waits on its queue
        assert feed.subscribers == 1
        feed.publish("user.speech_started", T0 + 2)  # the loop exists but is not running
        feed.close(T0 + 3, "hangup")
        events = loop.run_until_complete(reader)
    finally:
        loop.close()
    assert [e["type"] for e in events] == ["call.started", "user.speech_started", "call.ended"]


# Property: any interleaving of publishes, subscriptions, reads and close. ----------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 4)),
        st.tuples(st.just("subscribe"), st.just(0)),
        st.tuples(st.just("read"), st.integers(0, 9), st.integers(0, 6)),
        st.tuples(st.just("close"), st.booleans()),
    ),
    max_size=40,
)


class Reader:
    """A subscriber that reads only as many events as it is granted."""

    def __init__(self, feed: EventFeed, published: int) -> None:
        self.published_at_subscribe = published
        self.got: list[int] = []
        self.credits = asyncio.Semaphore(0)
        self.task = asyncio.create_task(self._run(feed.subscribe()))

    async def _run(self, stream: Any) -> None:
        await self.credits.acquire()  # the first read subscribes
        async for event in stream:
            self.got.append(event["n"])
            await self.credits.acquire()

    def grant(self, count: int) -> None:
        for _ in range(count):
            self.credits.release()


@settings(max_examples=300, deadline=None)
@given(ops=OPS, backlog=st.integers(0, 5), queue=st.integers(1, 4))
def test_any_interleaving_delivers_in_order_without_duplicates_and_ends_on_close(
    ops, backlog, queue
):
    async def body() -> None:
        feed = EventFeed(T0, backlog=backlog, subscriber_queue=queue)
        published: list[int] = []  # the `n` of every event, in publish order
        readers: list[Reader] = []
        subscribed_at: dict[int, int] = {}  # reader -> events published when it subscribed

        def publish(count: int) -> None:
            for _ in range(count):
                n = len(published)
                feed.publish("e", T0 + n, n=n)
                if not feed.closed:
                    published.append(n)

        for op in ops:
            if op[0] == "publish":
                publish(op[1])
            elif op[0] == "subscribe":
                readers.append(Reader(feed, len(published)))
            elif op[0] == "read" and readers:
                reader = readers[op[1] % len(readers)]
                if id(reader) not in subscribed_at and op[2]:
                    subscribed_at[id(reader)] = len(published)
                reader.grant(op[2])
            elif op[0] == "close":
                feed.close(T0 + len(published), None)
            await settle()
            for reader in readers:  # at every step: a contiguous run of what was published
                if reader.got:
                    start = reader.got[0]
                    assert reader.got == list(range(start, start + len(reader.got)))
                    assert reader.got[-1] < len(published)

        feed.close(T0 + len(published), None)
        for reader in readers:
            reader.grant(len(published) + 2)
        await asyncio.wait_for(asyncio.gather(*(r.task for r in readers)), 2)  # every stream ends

        truncated = 0
        for reader in readers:
            at = subscribed_at.get(id(reader), len(published))
            first = max(0, at - backlog)
            expected = published[first:]
            assert reader.got == expected[: len(reader.got)]  # in order, never duplicated
            truncated += reader.got != expected
        assert feed.dropped_subscribers == truncated
        assert feed.subscribers == 0

    asyncio.run(body())
