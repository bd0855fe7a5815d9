"""RelayRouter decisions with a real shared-memory table and a fake clock (no sockets)."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.relay.router import MAX_DATAGRAM, RelayRouter
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire import envelope, stun
from voicerelay.wire.token import TokenKeys

KEYS = TokenKeys({0: os.urandom(32)}, 0)
T1, T2 = ("127.0.0.1", 5001), ("127.0.0.1", 5002)
CLIENT = ("198.51.100.7", 40000)


def binding(transceiver, cluster=0, keys=KEYS):
    token = keys.seal(cluster, transceiver)
    return stun.build(
        stun.BINDING_REQUEST, os.urandom(12), [(stun.ATTR_USERNAME, f"{token}:c".encode())]
    )


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 64)
    yield t
    t.close()
    t.unlink()


def test_first_stun_opens_a_flow_and_media_follows_it(table):
    router = RelayRouter(KEYS, table, 0)
    assert router.from_client(b"\x80media", CLIENT, 0.0) is None
    assert router.drops["unknown_flow"] == 1
    dest, env = router.from_client(binding(T1), CLIENT, 0.0)
    assert dest == T1 and envelope.unpack_header(env) == CLIENT
    assert router.from_client(b"\x80media", CLIENT, 0.1) == (
        T1,
        envelope.pack(CLIENT, b"\x80media"),
    )
    assert router.from_client(b"\x17dtls", CLIENT, 0.1)[0] == T1
    assert table.lookup(CLIENT)[1].transceiver == T1


def test_return_path_only_for_the_bound_transceiver(table):
    router = RelayRouter(KEYS, table, 0)
    router.from_client(binding(T1), CLIENT, 0.0)
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x80back"), T1, 0.1) == (
        CLIENT,
        b"\x80back",
    )
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x80spoof"), T2, 0.1) is None
    assert router.drops["return_wrong_transceiver"] == 1
    assert router.from_transceiver(envelope.pack(("203.0.113.1", 1), b"x"), T1, 0.1) is None
    assert router.drops["return_no_flow"] == 1
    bad_version = bytearray(envelope.pack(("203.0.113.1", 1), b"x"))
    bad_version[2] = 9
    assert router.from_transceiver(bytes(bad_version), T1, 0.1) is None
    assert router.drops["envelope_version"] == 1
    assert router.from_transceiver(b"junk", T1, 0.1) is None
    assert router.drops["envelope_malformed"] == 1


def test_a_new_token_from_the_same_address_rebinds(table):
    router = RelayRouter(KEYS, table, 0)
    router.from_client(binding(T1), CLIENT, 0.0)
    assert router.from_client(binding(T2), CLIENT, 1.0)[0] == T2
    assert router.from_client(b"\x80m", CLIENT, 1.0)[0] == T2
    assert router.events["flows_rebound"] == 1
    assert router.from_transceiver(envelope.pack(CLIENT, b"x"), T1, 1.0) is None


def test_bad_tokens_foreign_clusters_and_oversize_are_counted(table):
    router = RelayRouter(KEYS, table, 0, cluster_routes={9: ("10.0.0.9", 7000)})
    other_keys = TokenKeys({0: os.urandom(32)}, 0)
    assert router.from_client(binding(T1, keys=other_keys), CLIENT, 0) is None
    assert router.drops["bad_token"] == 1
    assert router.from_client(binding(T1, cluster=4), CLIENT, 0) is None
    assert router.drops["foreign_cluster"] == 1
    assert router.from_client(binding(T1, cluster=9), ("192.0.2.1", 1), 0)[0] == ("10.0.0.9", 7000)
    router.from_client(binding(T1), CLIENT, 0)
    assert router.from_client(b"\x80" * (MAX_DATAGRAM + 1), CLIENT, 0) is None
    assert router.drops["oversize"] == 1
    assert router.from_client(b"", CLIENT, 0) is None
    assert router.drops["malformed"] == 1


def test_flows_of_another_worker_are_adopted(table):
    first, second = RelayRouter(KEYS, table, 0), RelayRouter(KEYS, table, 1)
    first.from_client(binding(T1), CLIENT, 0.0)
    assert second.from_client(b"\x80m", CLIENT, 0.5)[0] == T1
    assert second.events["flows_adopted"] == 1
    assert table.lookup_in(1, CLIENT).transceiver == T1
    assert second.from_transceiver(envelope.pack(CLIENT, b"r"), T1, 0.5) == (CLIENT, b"r")


def test_a_restarted_worker_reloads_its_shard(table):
    RelayRouter(KEYS, table, 0).from_client(binding(T1), CLIENT, 0.0)
    reborn = RelayRouter(KEYS, table, 0)
    assert reborn.from_client(b"\x80m", CLIENT, 0.1)[0] == T1
    assert reborn.events["flows_adopted"] == 0


def test_counters_reach_shared_memory_only_on_flush(table):
    router = RelayRouter(KEYS, table, 0)
    router.from_client(binding(T1), CLIENT, 0.0)
    router.flush(0.0)
    for _ in range(5):
        router.from_client(b"\x80m", CLIENT, 1.0)
    assert table.lookup(CLIENT)[1].packets_in == 1  # the hot path wrote nothing
    router.flush(2.0)
    record = table.lookup(CLIENT)[1]
    assert record.packets_in == 6 and record.last_seen == 2.0


def test_idle_flows_expire_active_ones_stay(table):
    router = RelayRouter(KEYS, table, 0, idle_timeout=5.0)
    router.from_client(binding(T1), CLIENT, 0.0)
    router.from_client(binding(T2), ("192.0.2.2", 2), 0.0)
    router.flush(0.0)
    router.from_client(b"\x80m", CLIENT, 4.0)
    router.flush(4.0)
    expired = []
    for _ in range(100):  # expiry sweeps a slice per tick
        expired += router.expire(6.0)
    assert expired == [("192.0.2.2", 2)]
    assert router.from_client(b"\x80m", ("192.0.2.2", 2), 6.0) is None
    assert router.from_client(b"\x80m", CLIENT, 6.0)[0] == T1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600), st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)))
def test_no_input_makes_the_router_raise(data, source):
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 1, 16)
    try:
        router = RelayRouter(KEYS, t, 0)
        router.from_client(binding(T1), CLIENT, 0.0)
        router.from_client(data, source, 0.0)
        router.from_client(data, CLIENT, 0.0)
        router.from_transceiver(data, T1, 0.0)
        assert router.from_client(b"\x80ok", CLIENT, 0.0)[0] == T1
    finally:
        t.close()
        t.unlink()
