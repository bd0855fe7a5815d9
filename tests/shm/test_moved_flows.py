"""A flow adopted by another worker leaves a copy in its old shard: the old owner's sweep
removes that copy once it is silent and another shard holds a fresher one."""

from __future__ import annotations

import uuid

import pytest

from voicerelay.relay.snapshot import freshest
from voicerelay.shm.flowtable import FlowRecord, FlowTable

CLIENT, T1, T2 = ("198.51.100.9", 4000), ("127.0.0.1", 5001), ("127.0.0.1", 5002)


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 16)
    yield t
    t.close()
    t.unlink()


def test_the_stale_copy_goes_and_the_fresh_one_stays(table):
    old, new = table.shard(0), table.shard(1)
    old.put(CLIENT, T1, now=10.0)
    new.put(CLIENT, T1, now=20.0)  # adopted later by worker 1, which sees its packets
    assert new.expire(20.5, idle=30, moved_after=1.0) == []  # fresh: nothing moved
    assert old.expire(20.5, idle=30, moved_after=1.0) == [CLIENT]
    assert table.count() == 1 and table.lookup(CLIENT)[0] == 1
    assert new.expire(40.0, idle=30, moved_after=1.0) == []  # the only copy: kept until idle


def test_a_recently_active_copy_is_kept_even_if_another_is_fresher(table):
    a, b = table.shard(0), table.shard(1)
    a.put(CLIENT, T1, now=10.0)
    b.put(CLIENT, T1, now=10.4)
    assert a.expire(10.5, idle=30, moved_after=1.0) == []  # silent only 0.5 s here
    assert table.count() == 2


def test_without_moved_after_only_idleness_removes(table):
    a, b = table.shard(0), table.shard(1)
    a.put(CLIENT, T1, now=10.0)
    b.put(CLIENT, T1, now=20.0)
    assert a.expire(25.0, idle=30) == []
    assert table.count() == 2


def test_a_snapshot_keeps_the_freshest_binding_of_each_client():
    stale = FlowRecord(CLIENT, T1, last_seen=5.0)
    fresh = FlowRecord(CLIENT, T2, last_seen=9.0)
    other = FlowRecord(("198.51.100.10", 4000), T1, last_seen=1.0)
    assert sorted(freshest([fresh, other, stale]), key=lambda r: r.last_seen) == [other, fresh]
    assert freshest([stale, fresh]) == [fresh]
