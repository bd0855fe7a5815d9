"""Snapshot codec and stores (file; Redis as a real redis-server), and the snapshotter's
behaviour when Redis is down, paused, or comes back."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.procs import RedisServer, wait_for
from voicerelay.relay.snapshot import (
    FileStore,
    RedisStore,
    SnapshotError,
    Snapshotter,
    decode_snapshot,
    encode_snapshot,
    restore,
)
from voicerelay.shm.flowtable import FlowRecord, FlowTable

addrs = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(0, 65535)
)
records = st.builds(
    FlowRecord,
    addrs,
    addrs,
    st.floats(0, 1000),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)


@given(st.lists(records, max_size=20))
def test_codec_round_trips(flows):
    blob = encode_snapshot(flows, now=1000.0, wall=5000.0)
    back = decode_snapshot(blob, now=2000.0, wall_now=5000.0)
    assert [(r.client, r.transceiver, r.packets_in, r.packets_out) for r in back] == [
        (r.client, r.transceiver, r.packets_in, r.packets_out) for r in flows
    ]
    for before, after in zip(flows, back, strict=True):  # same idle age on the new clock
        assert (2000.0 - after.last_seen) == pytest.approx(1000.0 - before.last_seen, abs=1e-6)


def test_downtime_counts_against_the_idle_timeout():
    flows = [
        FlowRecord(("10.0.0.1", 1), ("127.0.0.1", 5), 99.0),
        FlowRecord(("10.0.0.2", 1), ("127.0.0.1", 5), 80.0),
    ]
    blob = encode_snapshot(flows, now=100.0, wall=1000.0)
    kept = decode_snapshot(blob, now=0.0, wall_now=1010.0, idle_timeout=15.0)
    assert [r.client for r in kept] == [("10.0.0.1", 1)]  # 1 s idle + 10 s down < 15 s


@given(st.binary(max_size=200))
def test_garbage_raises_only_snapshot_error(blob):
    with contextlib.suppress(SnapshotError):
        decode_snapshot(blob, 0.0)


@given(st.data())
def test_truncated_snapshots_are_refused_whole(data):
    blob = encode_snapshot([FlowRecord(("10.0.0.1", 1), ("127.0.0.1", 5), 1.0)] * 3, 1.0)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(SnapshotError):
        decode_snapshot(blob[:cut], 1.0)


def test_unknown_versions_and_damaged_flows_are_refused():
    with pytest.raises(SnapshotError, match="version"):
        decode_snapshot(
            msgpack.packb({"format": "voicerelay-flows", "v": 2, "wall": 0, "flows": []}), 0
        )
    bad = msgpack.packb(
        {
            "format": "voicerelay-flows",
            "v": 1,
            "wall": 0,
            "flows": [["10.0.0.1", 1, "not-an-ip", 5, 0.0, 0, 0]],
        }
    )
    with pytest.raises(SnapshotError, match="flow 0"):
        decode_snapshot(bad, 0)


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 64)
    yield t
    t.close()
    t.unlink()


def test_file_store_restores_into_an_empty_table(tmp_path, table):
    store = FileStore(tmp_path / "snap")
    assert store.load() is None
    table.shard(0).put(("10.0.0.1", 1), ("127.0.0.1", 5), 10.0)
    table.shard(1).put(("::1", 2), ("127.0.0.1", 6), 10.0)
    assert Snapshotter(table, store, clock=lambda: 12.0).snapshot_once()
    fresh = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 3, 64)
    try:
        assert restore(fresh, store, now=50.0) == 2
        assert fresh.lookup(("::1", 2))[1].transceiver == ("127.0.0.1", 6)
        assert fresh.lookup(("10.0.0.1", 1))[1].last_seen == pytest.approx(48.0, abs=0.5)
        assert restore(fresh, store, now=50.0) == 0  # never over a non-empty table
    finally:
        fresh.close()
        fresh.unlink()


def test_corrupt_file_is_refused_with_a_log_line(tmp_path, table, caplog):
    store = FileStore(tmp_path / "snap")
    (tmp_path / "snap").write_bytes(b"\x93garbage")
    with caplog.at_level(logging.ERROR, "voicerelay.snapshot"):
        assert restore(table, store, 0.0) == 0
    assert "refused" in caplog.text and table.count() == 0


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path) as server:
        yield server


def test_redis_store_round_trip_with_expiry(redis_server, table):
    store = RedisStore(redis_server.url, "voicerelay:0:relay:1:flows", ttl=77)
    table.shard(0).put(("10.0.0.1", 1), ("127.0.0.1", 5), 1.0)
    assert Snapshotter(table, store, clock=lambda: 1.0).snapshot_once()
    client = redis_server.client()
    assert 0 < client.ttl("voicerelay:0:relay:1:flows") <= 77
    assert [r.client for r in decode_snapshot(store.load(), 1.0)] == [("10.0.0.1", 1)]


def test_redis_down_then_back_snapshotter_backs_off_and_resumes(redis_server, table, caplog):
    store = RedisStore(redis_server.url, "k", ttl=60)
    snapper = Snapshotter(table, store, interval=0.05)
    with caplog.at_level(logging.INFO, "voicerelay.snapshot"):
        snapper.start()
        wait_for(lambda: snapper.state()["snapshots"] >= 2, 5, what="first snapshots")
        redis_server.stop()
        wait_for(lambda: snapper.state()["consecutive_failures"] >= 3, 10, what="failures")
        assert caplog.text.count("failed (will retry") == 1  # logged once per streak
        redis_server.start()
        wait_for(lambda: snapper.state()["consecutive_failures"] == 0, 15, what="resumed snapshots")
        snapper.stop(final=True)
    assert "resumed" in caplog.text
    state = snapper.state()
    assert state["failures"] >= 3 and state["last_ok"] is not None


def test_a_paused_redis_costs_a_bounded_timeout_not_a_hang(redis_server, table):
    store = RedisStore(redis_server.url, "k", ttl=60, timeout=0.3)
    pauser = redis_server.client()
    pauser.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    started = time.monotonic()
    ok = Snapshotter(table, store).snapshot_once()
    assert not ok and time.monotonic() - started < 1.5


def test_snapshotter_thread_does_not_hold_up_its_caller(redis_server, table):
    store = RedisStore(redis_server.url, "k", ttl=60, timeout=2.0)
    redis_server.client().execute_command("DEBUG", "SLEEP", "0")  # debug command available
    snapper = Snapshotter(table, store, interval=0.05)
    snapper.start()
    blocker = threading.Thread(
        target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "1.5")
    )
    blocker.start()
    started = time.monotonic()
    ticks = 0
    while time.monotonic() - started < 1.0:  # the caller's loop keeps its pace meanwhile
        time.sleep(0.01)
        ticks += 1
    assert ticks > 50
    blocker.join()
    snapper.stop(final=False)
