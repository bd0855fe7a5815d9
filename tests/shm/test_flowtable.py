"""The shared-memory flow table against a dict model, across processes, and after crashes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowRecord, FlowTable, TableFull

CAPACITY = 8
clients = st.tuples(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "2001:db8::7"]), st.integers(1, 4)
)
transceivers = st.tuples(st.sampled_from(["127.0.0.1", "::1"]), st.integers(5000, 5002))


def unique_name() -> str:
    return f"vr-test-{uuid.uuid4().hex[:12]}"


class FlowTableMachine(RuleBasedStateMachine):
    """Writer operations on shard 0 of a small table, checked against a dict after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable.create(unique_name(), 2, CAPACITY)
        self.writer = self.table.shard(0)
        self.model: dict[tuple, dict] = {}
        self.now = 0.0

    @rule(client=clients, transceiver=transceivers)
    def put(self, client, transceiver):
        self.now += 1
        if client not in self.model and len(self.model) == CAPACITY:
            with pytest.raises(TableFull):
                self.writer.put(client, transceiver, self.now)
            return
        self.writer.put(client, transceiver, self.now)
        self.model[client] = {"transceiver": transceiver, "last_seen": self.now, "in": 0, "out": 0}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), packets=st.integers(0, 2**32 - 1))
    def touch(self, data, packets):
        client = data.draw(st.sampled_from(sorted(self.model)))
        slot, _ = self.writer.get(client)
        self.now += 1
        self.writer.touch(slot, self.now, packets, packets // 2)
        self.model[client].update(last_seen=self.now, **{"in": packets, "out": packets // 2})

    @rule(client=clients)
    def remove(self, client):
        assert self.writer.remove(client) == (client in self.model)
        self.model.pop(client, None)

    @rule(client=clients)
    def evict(self, client):
        flow = self.model.get(client)
        unanswered = flow is not None and flow["out"] == 0
        assert self.writer.evict(client) == unanswered
        if unanswered:
            del self.model[client]

    @rule(idle=st.floats(0, 10), unanswered=st.none() | st.floats(0, 10))
    def expire(self, idle, unanswered):
        self.now += 1
        removed = set(self.writer.expire(self.now, idle, unanswered_after=unanswered))
        expected = {
            c
            for c, f in self.model.items()
            if self.now - f["last_seen"] > idle
            or (unanswered is not None and f["out"] == 0 and self.now - f["last_seen"] > unanswered)
        }
        assert removed == expected
        for client in expected:
            del self.model[client]

    @invariant()
    def readers_agree_with_the_model(self):
        for client, flow in self.model.items():
            shard, record = self.table.lookup(client)
            assert shard == 0
            assert record.transceiver == flow["transceiver"]
            assert record.last_seen == flow["last_seen"]
            assert (record.packets_in, record.packets_out) == (flow["in"], flow["out"])
        assert self.table.count() == len(self.model) == len(self.writer)
        assert {r.client for r in self.table.records()} == set(self.model)
        assert self.table.lookup(("192.0.2.99", 9)) is None

    def teardown(self):
        self.table.close()
        self.table.unlink()


TestFlowTableMachine = FlowTableMachine.TestCase
TestFlowTableMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_every_attaching_worker_changes_the_generation():
    table = FlowTable.create(unique_name(), 2, 16)
    try:
        other = FlowTable.attach(table.name)
        seen = {table.generation}
        for _ in range(300):  # a byte: it wraps, and still changes every time
            before = other.generation
            assert table.bump_generation() != before
            seen.add(other.generation)
        assert len(seen) == 256
        assert table.count() == 0  # the header byte is not a slot
        other.close()
    finally:
        table.close()
        table.unlink()


tags = st.binary(min_size=8, max_size=8).filter(any)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(range(8))), max_size=60), st.data())
def test_token_marks_read_back_the_latest_time_of_any_worker(marks, data):
    """With no more tokens than a probe path holds, every mark is kept: readers see, per token,
    the latest time any shard's writer marked it."""
    names = data.draw(st.lists(tags, min_size=8, max_size=8, unique=True))
    table = FlowTable.create(unique_name(), 3, 64)
    try:
        writers = [table.shard(i) for i in range(3)]
        latest: dict[bytes, float] = {}
        for when, (shard, n) in enumerate(marks):
            writers[shard].mark_token(names[n], float(when))
            latest[names[n]] = float(when)
        for tag in names:
            assert table.token_marked(tag) == latest.get(tag)
        assert table.count() == 0  # marks are not flows
    finally:
        table.close()
        table.unlink()


@given(st.lists(tags, min_size=1, max_size=200, unique=True))
def test_token_marks_are_bounded_and_keep_the_newest(names):
    table = FlowTable.create(unique_name(), 1, 16)
    try:
        writer = table.shard(0)
        for when, tag in enumerate(names):
            writer.mark_token(tag, float(when))
            assert table.token_marked(tag) == float(when)  # the newest is always there
        stored = [
            bytes(table.buf[table.mark_offset(0, i) : table.mark_offset(0, i) + 8])
            for i in range(16)
        ]
        kept = [t for t in stored if any(t)]
        assert len(kept) == len(set(kept)) <= 16
        assert os.stat(f"/dev/shm/{table.name}").st_size == 64 + 16 * (64 + 16)
    finally:
        table.close()
        table.unlink()


def test_slots_are_64_bytes_and_the_segment_is_flat():
    """A full shard of the widest records (IPv6 both ends, top counters) reads back exactly,
    stays inside its 64-byte slots (the next shard stays zero), and the segment is one flat
    block of header + shards x capacity x 64 bytes (+ 16 bytes of token mark each), whatever
    is stored."""
    shards, capacity = 2, 16
    name = unique_name()
    table = FlowTable.create(name, shards, capacity)
    try:
        size = os.stat(f"/dev/shm/{name}").st_size
        assert size == 64 + shards * capacity * (64 + 16)
        assert table.slot_offset(0, 1) - table.slot_offset(0, 0) == 64
        writer = table.shard(0)
        top = 2**32 - 1
        flows = {
            (f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}", 65535 - i): (f"fd00::{i + 1:x}", 65535)
            for i in range(capacity)
        }
        for n, (client, transceiver) in enumerate(flows.items()):
            slot = writer.put(client, transceiver, 1e9 + n)
            writer.touch(slot, 1e9 + n, top, top)
        with pytest.raises(TableFull):
            writer.put(("2001:db8::1", 1), ("fd00::1", 1), 0.0)
        for n, (client, transceiver) in enumerate(flows.items()):
            assert table.lookup(client) == (0, FlowRecord(client, transceiver, 1e9 + n, top, top))
        assert not any(table.buf[table.slot_offset(1, 0) :])  # the next shard is untouched
        assert os.stat(f"/dev/shm/{name}").st_size == size
    finally:
        table.close()
        table.unlink()


def _hammer(name: str, seconds: float) -> None:
    """Child: rewrite the same flows over and over, every field derived from one counter."""
    table = FlowTable.attach(name)
    writer = table.shard(1)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        for i in range(4):
            client = (f"10.1.0.{i}", 1000 + i)
            if n % 7 == 0:
                writer.remove(client)
            else:
                port = n % 60000 + 1
                writer.put(client, (f"127.0.{n % 250}.{n % 250}", port), float(n), n, n)
    table.close()


def test_readers_in_another_process_never_see_a_torn_record():
    name = unique_name()
    table = FlowTable.create(name, 2, 64)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_hammer, args=(name, 1.0))
    child.start()
    reads = 0
    try:
        while child.is_alive():
            for i in range(4):
                hit = table.lookup((f"10.1.0.{i}", 1000 + i))
                if hit is None:
                    continue
                record = hit[1]
                n = int(record.last_seen)
                assert record.packets_in == n and record.packets_out == n
                assert record.transceiver == (f"127.0.{n % 250}.{n % 250}", n % 60000 + 1)
                reads += 1
        child.join()
        assert child.exitcode == 0
        assert reads > 1000
    finally:
        table.close()
        table.unlink()


def _attach_and_exit(name: str) -> None:
    FlowTable.attach(name).shard(0).put(("10.9.9.9", 9), ("127.0.0.1", 1), 1.0)


def test_an_attaching_process_that_exits_leaves_the_segment():
    name = unique_name()
    table = FlowTable.create(name, 1, 16)
    try:
        child = multiprocessing.get_context("spawn").Process(target=_attach_and_exit, args=(name,))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert os.path.exists(f"/dev/shm/{name}")
        assert table.lookup(("10.9.9.9", 9)) is not None
    finally:
        table.close()
        table.unlink()


def _own_and_hang(name: str) -> None:
    FlowTable.create(name, 1, 16)
    CounterArray.create(name + "-c", 1, ["a"])
    time.sleep(60)


def test_stale_segments_of_a_killed_owner_are_cleared():
    name = unique_name()
    ctx = multiprocessing.get_context("fork")
    owner = ctx.Process(target=_own_and_hang, args=(name,))
    owner.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/dev/shm/{name}-c") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not FlowTable.clear_stale(name)  # the owner is alive: hands off
    os.kill(owner.pid, signal.SIGKILL)
    owner.join()
    assert FlowTable.clear_stale(name)
    assert CounterArray.clear_stale(name + "-c")
    assert not os.path.exists(f"/dev/shm/{name}")
    assert not FlowTable.clear_stale(name)  # nothing left to clear


def test_counters_round_trip_between_rows():
    name = unique_name()
    counters = CounterArray.create(name, 2, ["packets_in", "drop_bad_token"])
    try:
        counters.publish(1, {"packets_in": 2**63, "drop_bad_token": 5, "ignored": 1})
        reader = CounterArray.attach(name)
        assert reader.read(1) == {"packets_in": 2**63, "drop_bad_token": 5}
        assert reader.read(0) == {"packets_in": 0, "drop_bad_token": 0}
        reader.close()
    finally:
        counters.close()
        counters.unlink()


RACE = """
import multiprocessing as mp, uuid
from multiprocessing import resource_tracker
from voicerelay.shm.flowtable import FlowTable
name = "vr-race-" + uuid.uuid4().hex[:8]
table = FlowTable.create(name, 2, 16)
resource_tracker.ensure_running()  # one tracker shared by forked children, as in the launcher
def attach():
    for _ in range(200):
        FlowTable.attach(name).close()
procs = [mp.get_context("fork").Process(target=attach) for _ in range(4)]
[p.start() for p in procs]
[p.join() for p in procs]
table.close()
table.unlink()
"""


def test_workers_attaching_together_print_no_traceback():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", RACE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "Traceback" not in result.stderr, result.stderr[-500:]


def test_a_segment_held_by_a_recycled_pid_is_stale():
    """The owner is a pid *and* its start time: a live stranger with the pid is no owner."""
    from voicerelay.shm import segment

    name = unique_name()
    table = FlowTable.create(name, 1, 16)
    try:
        assert segment.live_owner(name) == os.getpid()
        magic, version, pid, started = segment.OWNER.unpack_from(table.buf, 0)
        segment.OWNER.pack_into(table.buf, 0, magic, version, pid, started - 3600)
        assert segment.live_owner(name) is None
        other = FlowTable.attach(name)
        other.close()
    finally:
        table.close()
        table.unlink()
