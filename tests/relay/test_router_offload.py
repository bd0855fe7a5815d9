"""The router's side of the kernel fast path (pure: a real shared-memory table, a fake clock, a
dict standing in for the kernel's map): which flows it hands to the kernel, when it takes them
back, and how the kernel's counts come back into its counters and liveness."""

from __future__ import annotations

import socket
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.relay.test_router import CLIENT, LATER, T1, T2, answer, binding, make_router
from voicerelay.relay.fastpath.layout import flow_key
from voicerelay.relay.router import RelayRouter
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire import envelope
from voicerelay.wire.addr import sockaddr

KEY = flow_key(sockaddr(CLIENT))


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 64)
    yield t
    t.close()
    t.unlink()


def offloading(table, **options) -> RelayRouter:
    return make_router(table, offload=True, **options)


def open_answered(router, client=CLIENT, now=LATER, transceiver=T1) -> None:
    assert router.from_client(binding(transceiver), client, now)
    answer(router, client, now, transceiver)


def test_a_flow_goes_to_the_kernel_once_it_carried_return_traffic(table):
    router = offloading(table)
    assert router.from_client(binding(T1), CLIENT, LATER)
    router.flush(LATER)
    assert router.take_kernel_ops() == []  # never answered: junk must not reach the kernel
    answer(router, CLIENT, LATER)
    router.flush(LATER + 0.1)
    ops = router.take_kernel_ops()
    assert [(key, flow.transceiver_peer) for key, flow in ops] == [(KEY, sockaddr(T1))]
    router.flush(LATER + 0.2)
    assert router.take_kernel_ops() == []  # once
    assert router.counters()["kernel_flows"] == 1


def test_without_offload_nothing_goes_to_the_kernel(table):
    router = make_router(table)
    open_answered(router)
    router.flush(LATER)
    assert router.take_kernel_ops() == [] and router.counters()["kernel_flows"] == 0


def test_tcp_flows_and_ipv6_sockets_stay_in_userspace(table):
    router = offloading(table)
    peer = sockaddr(CLIENT)
    assert router.tcp_datagram(binding(T1), peer, LATER)
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x01\x01answer"), T1, LATER) is None
    assert router.tcp_out  # answered, through its connection
    router.flush(LATER)
    assert router.take_kernel_ops() == []
    v6 = offloading(table, public_family=socket.AF_INET6, internal_family=socket.AF_INET6)
    assert not v6.offload


def test_expiry_takes_the_flow_back_from_the_kernel(table):
    router = offloading(table, idle_timeout=5.0)
    open_answered(router)
    router.flush(LATER)
    router.take_kernel_ops()
    now = LATER
    while router.flows and now < LATER + 30:
        now += 0.5
        router.expire(now)
    assert not router.flows
    assert router.take_kernel_ops() == [(KEY, None)]
    assert router.counters()["kernel_flows"] == 0


def test_kernel_traffic_counts_and_keeps_the_flow_alive(table):
    router = offloading(table, idle_timeout=5.0)
    open_answered(router)
    router.flush(LATER)
    router.take_kernel_ops()
    before = router.counters()
    now, sent = LATER, 0
    while now < LATER + 20:  # the kernel forwards every datagram: userspace sees none
        now += 1.0
        sent += 50
        assert router.kernel_activity(KEY, (sent, sent * 100, sent, sent * 120), now - 0.01, now)
        router.flush(now)
        router.expire(now)
    assert CLIENT in router.flows  # alive on the kernel's return traffic alone
    after = router.counters()
    assert after["packets_in"] - before["packets_in"] == sent
    assert after["packets_out"] - before["packets_out"] == sent
    assert after["bytes_out"] - before["bytes_out"] == sent * 120
    assert after["kernel_packets_in"] == sent and after["kernel_bytes_in"] == sent * 100
    assert table.lookup(CLIENT)[1].packets_out == sent + 1  # + the STUN answer
    assert table.lookup(CLIENT)[1].last_seen == pytest.approx(now - 0.01)
    while CLIENT in router.flows:  # the kernel goes quiet: the flow expires on time
        now += 0.5
        router.expire(now)
    assert now - (LATER + 20 - 0.01) == pytest.approx(5.5, abs=0.6)


def test_counts_from_an_entry_put_in_again_start_from_zero(table):
    router = offloading(table)
    open_answered(router)
    router.flush(LATER)
    router.take_kernel_ops()
    router.kernel_activity(KEY, (10, 1000, 10, 1000), LATER, LATER + 1)
    router.kernel_activity(KEY, (3, 300, 2, 200), LATER + 1, LATER + 2)
    assert router.counters()["kernel_packets_in"] == 13
    assert router.counters()["kernel_packets_out"] == 12


def test_activity_under_a_key_the_router_does_not_offload_is_refused(table):
    router = offloading(table)
    assert not router.kernel_activity(KEY, (1, 1, 1, 1), LATER, LATER)


def test_a_rebind_takes_the_old_entry_back_before_the_new_one_is_offloaded(table):
    router = offloading(table, rebind_after=2.0)
    open_answered(router)
    router.flush(LATER)
    router.take_kernel_ops()
    now = LATER + 3.0  # silent past rebind_after: a new token may move it
    assert router.from_client(binding(T2), CLIENT, now)[0] == T2
    assert router.take_kernel_ops() == [(KEY, None)]
    answer(router, CLIENT, now, T2)
    router.flush(now)
    assert [(k, f.transceiver_peer) for k, f in router.take_kernel_ops()] == [(KEY, sockaddr(T2))]


def test_a_restarted_worker_takes_up_its_entries_without_counting_twice(table):
    old = offloading(table)
    open_answered(old)
    old.flush(LATER)
    old.take_kernel_ops()
    old.kernel_activity(KEY, (40, 4000, 40, 4000), LATER + 1, LATER + 1)
    old.flush(LATER + 1)
    new = offloading(table, now=LATER + 2)  # same shard, a new incarnation
    assert new.adopt_offloaded(KEY, CLIENT, (40, 4000, 40, 4000), LATER + 2)
    assert new.take_kernel_ops() == []  # the entry is there already
    new.kernel_activity(KEY, (45, 4500, 45, 4500), LATER + 3, LATER + 3)
    assert new.counters()["kernel_packets_in"] == 5
    assert not new.adopt_offloaded(
        flow_key(sockaddr(("198.51.100.9", 1))), ("198.51.100.9", 1), (0,) * 4, LATER + 3
    )


CLIENTS = [(f"198.51.100.{i}", 40000 + i) for i in range(1, 5)]


class OffloadModel(RuleBasedStateMachine):
    """Random traffic, kernel activity, rebinds and expiry: after the worker applies the
    router's operations to the map (a dict here), the map holds exactly the flows the router
    offloads, each to the transceiver the shared table names."""

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 64)
        self.router = offloading(self.table, idle_timeout=4.0, rebind_after=2.0)
        self.kernel: dict[bytes, bytes] = {}  # key -> transceiver sockaddr
        self.counts: dict[bytes, int] = {}
        self.now = LATER

    def teardown(self) -> None:
        self.table.close()
        self.table.unlink()

    @rule(client=st.sampled_from(CLIENTS), transceiver=st.sampled_from([T1, T2]))
    def check(self, client, transceiver):
        self.router.from_client(binding(transceiver), client, self.now)

    @rule(client=st.sampled_from(CLIENTS))
    def reply(self, client):
        flow = self.router.flows.get(client)
        if flow is not None:
            self.router.from_transceiver(
                envelope.pack(client, b"\x80r"), flow.transceiver, self.now
            )

    @rule(n=st.integers(1, 50))
    def kernel_forwards(self, n):
        for key in list(self.kernel):
            self.counts[key] = self.counts.get(key, 0) + n
            c = self.counts[key]
            if not self.router.kernel_activity(key, (c, c, c, c), self.now, self.now):
                del self.kernel[key]

    @rule(dt=st.floats(0.05, 3.0))
    def tick(self, dt):
        self.now += dt
        self.router.flush(self.now)
        self.router.expire(self.now)
        for key, flow in self.router.take_kernel_ops():
            if flow is None:
                self.kernel.pop(key, None)
            else:
                self.kernel[key] = flow.transceiver_peer
            self.counts.pop(key, None)

    @precondition(lambda self: not self.router.kernel_ops)
    @invariant()
    def map_matches_router(self):
        assert set(self.kernel) == set(self.router.offloaded)
        for key, transceiver in self.kernel.items():
            flow = self.router.offloaded[key]
            assert flow.transceiver_peer == transceiver
            assert self.router.flows[flow.client] is flow
            assert sockaddr(self.table.lookup(flow.client)[1].transceiver) == transceiver


TestOffloadModel = OffloadModel.TestCase
TestOffloadModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
