"""RelayRouter decisions with a real shared-memory table and a fake clock (no sockets)."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.wire.test_token import old_format_token
from voicerelay.relay.admission import PrefixLimiter, prefix_of
from voicerelay.relay.router import ADOPT_WINDOW, MAX_DATAGRAM, RelayRouter
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire import envelope, stun
from voicerelay.wire.token import TokenKeys

SECRET = os.urandom(32)
KEYS = TokenKeys({0: SECRET}, 0)
T1, T2 = ("127.0.0.1", 5001), ("127.0.0.1", 5002)
CLIENT = ("198.51.100.7", 40000)
WALL = 1_700_000_000.0  # the wall clock at monotonic 0 in these tests
LATER = 10.0  # a monotonic time past the adoption window every router starts with


def token(transceiver=T1, cluster=0, keys=KEYS, issued=WALL) -> str:
    return keys.seal(cluster, transceiver, issued)


def binding(transceiver=T1, cluster=0, keys=KEYS, issued=WALL, ufrag=None) -> bytes:
    ufrag = ufrag or token(transceiver, cluster, keys, issued)
    return stun.build(
        stun.BINDING_REQUEST, os.urandom(12), [(stun.ATTR_USERNAME, f"{ufrag}:c".encode())]
    )


def make_router(table, shard=0, **options) -> RelayRouter:
    return RelayRouter(KEYS, table, shard, wall_offset=WALL, **options)


def answer(router, client, now, transceiver=T1) -> None:
    """The transceiver answers the client (what an honest one does for an authenticated check)."""
    assert router.from_transceiver(envelope.pack(client, b"\x01\x01answer"), transceiver, now)


def drops(router, reason) -> int:
    return router.counters()[f"drop_{reason}"]


@pytest.fixture
def table():
    t = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 64)
    yield t
    t.close()
    t.unlink()


def test_first_stun_opens_a_flow_and_media_follows_it(table):
    router = make_router(table)
    assert router.from_client(b"\x80media", CLIENT, 0.0) is None
    assert drops(router, "unknown_flow") == 1
    dest, env = router.from_client(binding(T1), CLIENT, 0.0)
    assert dest == T1 and envelope.unpack_header(env) == CLIENT
    assert router.from_client(b"\x80media", CLIENT, 0.1) == (
        T1,
        envelope.pack(CLIENT, b"\x80media"),
    )
    assert router.from_client(b"\x17dtls", CLIENT, 0.1)[0] == T1
    assert table.lookup(CLIENT)[1].transceiver == T1


def test_only_rfc7983_kinds_are_relayed(table):
    router = make_router(table)
    router.from_client(binding(T1), CLIENT, 0.0)
    for first in (4, 19, 64, 127, 192, 255):  # ZRTP, TURN channels, junk: even on a live flow
        assert router.from_client(bytes([first]) + b"x", CLIENT, 0.1) is None
    assert drops(router, "unknown_protocol") == 6
    for first in (0, 20, 63, 128, 191):
        assert router.from_client(bytes([first]) + b"x", CLIENT, 0.1)[0] == T1


def test_return_path_only_for_the_bound_transceiver(table):
    router = make_router(table)
    router.from_client(binding(T1), CLIENT, 0.0)
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x80back"), T1, 0.1) == (
        CLIENT,
        b"\x80back",
    )
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x80spoof"), T2, 0.1) is None
    assert drops(router, "return_wrong_transceiver") == 1
    assert router.from_transceiver(envelope.pack(("203.0.113.1", 1), b"x"), T1, 0.1) is None
    assert drops(router, "return_no_flow") == 1
    bad_version = bytearray(envelope.pack(("203.0.113.1", 1), b"x"))
    bad_version[2] = 9
    assert router.from_transceiver(bytes(bad_version), T1, 0.1) is None
    assert drops(router, "envelope_version") == 1
    assert router.from_transceiver(b"junk", T1, 0.1) is None
    assert drops(router, "envelope_malformed") == 1


def test_bad_tokens_foreign_clusters_and_oversize_are_counted(table):
    router = make_router(table, cluster_routes={9: ("10.0.0.9", 7000)})
    other_keys = TokenKeys({0: os.urandom(32)}, 0)
    assert router.from_client(binding(T1, keys=other_keys), CLIENT, 0) is None
    assert drops(router, "bad_token") == 1
    assert router.from_client(binding(T1, cluster=4), CLIENT, 0) is None
    assert drops(router, "foreign_cluster") == 1
    assert router.from_client(binding(T1, cluster=9), ("192.0.2.1", 1), 0)[0] == ("10.0.0.9", 7000)
    router.from_client(binding(T1), CLIENT, 0)
    assert router.from_client(b"\x80" * (MAX_DATAGRAM + 1), CLIENT, 0) is None
    assert drops(router, "oversize") == 1
    assert router.from_client(b"", CLIENT, 0) is None
    assert drops(router, "malformed") == 1


# Token age ----------------------------------------------------------------------------------


def test_a_token_opens_its_first_flow_only_within_its_window(table):
    router = make_router(table, token_window=30)
    assert router.from_client(binding(issued=WALL - 20), ("192.0.2.1", 1), 0.0)[0] == T1
    assert router.from_client(binding(issued=WALL - 40), ("192.0.2.2", 1), 0.0) is None
    assert router.from_client(binding(issued=WALL + 40), ("192.0.2.3", 1), 0.0) is None  # future
    assert drops(router, "token_expired") == 2
    ufrag = token(issued=WALL)
    late = 31.5  # the window, plus the second the issue time was truncated to
    assert router.from_client(binding(ufrag=ufrag), ("192.0.2.4", 1), late) is None
    router.wall_offset = WALL - late  # the wall clock stepped back: the token is fresh again
    assert router.from_client(binding(ufrag=ufrag), ("192.0.2.4", 1), late)[0] == T1


def test_a_token_in_use_opens_more_addresses_after_its_window(table):
    """A call whose client changes address after the window keeps going: the token is in use
    (its flow carries return traffic). Unanswered flows do not make a token in use."""
    router = make_router(table, token_window=30, idle_timeout=30)
    used, idle = token(), token()
    router.from_client(binding(ufrag=used), ("192.0.2.1", 1), 0.0)
    router.from_client(binding(ufrag=idle), ("192.0.2.2", 1), 0.0)
    answer(router, ("192.0.2.1", 1), 25.0)
    router.flush(25.0)
    assert router.from_client(binding(ufrag=used), ("192.0.2.1", 2), 40.0)[0] == T1
    assert router.from_client(binding(ufrag=idle), ("192.0.2.2", 2), 40.0) is None
    assert drops(router, "token_expired") == 1
    assert router.from_client(binding(ufrag=used), ("192.0.2.1", 3), 56.0) is None  # 31 s silent


def test_a_token_in_use_at_another_worker_opens_addresses_here(table):
    """A NAT moves a client to a new port mid-call and the kernel hashes it to another worker,
    which never saw the token: the first worker's mark in shared memory vouches for it."""
    first, second = make_router(table, idle_timeout=30), make_router(table, 1, idle_timeout=30)
    used, unused = token(), token()
    first.from_client(binding(ufrag=used), ("192.0.2.1", 1), 0.0)
    first.from_client(binding(ufrag=unused), ("192.0.2.2", 1), 0.0)
    answer(first, ("192.0.2.1", 1), 50.0)
    first.flush(50.0)
    assert second.from_client(binding(ufrag=used), ("192.0.2.1", 2), 60.0)[0] == T1
    assert second.from_client(binding(ufrag=unused), ("192.0.2.2", 2), 60.0) is None
    assert second.from_client(binding(ufrag=used), ("192.0.2.1", 3), 81.0) is None  # 31 s on
    assert drops(second, "token_expired") == 2


def test_an_existing_binding_keeps_working_with_an_old_token(table):
    """After a worker restart (flows in its shard, none in its memory) a call's consent check
    re-opens a token issued long ago: the call goes on; only new flows need a fresh token."""
    first = make_router(table)
    first.from_client(binding(ufrag=(ufrag := token())), CLIENT, 0.0)
    answer(first, CLIENT, 0.5)
    first.flush(0.5)
    reborn = make_router(table, now=3600.0)
    assert reborn.from_client(binding(ufrag=ufrag), CLIENT, 3600.0)[0] == T1
    assert reborn.from_client(binding(ufrag=ufrag), ("192.0.2.9", 1), 3600.0) is None
    assert drops(reborn, "token_expired") == 1


def test_old_format_tokens_open_no_flow_but_continue_a_bound_one(table):
    router = make_router(table)
    old = old_format_token(SECRET, 0, 0, T1)
    assert router.from_client(binding(ufrag=old), ("192.0.2.1", 1), 0.0) is None
    assert drops(router, "token_old_format") == 1
    router.from_client(binding(T1), CLIENT, 0.0)
    assert router.from_client(binding(ufrag=old), CLIENT, 0.1)[0] == T1  # bound before upgrade
    assert (
        router.from_client(binding(ufrag=old_format_token(SECRET, 0, 0, T2)), CLIENT, 0.1) is None
    )
    assert drops(router, "token_old_format") == 2


# Caps, rates, eviction -----------------------------------------------------------------------


def test_a_token_opens_flows_for_a_few_addresses_only(table):
    router = make_router(table, token_clients=4, idle_timeout=30, unanswered_timeout=5)
    ufrag = token()
    sources = [(f"192.0.{i}.1", 1000 + i) for i in range(10)]  # ten prefixes: no rate limit
    routed = [router.from_client(binding(ufrag=ufrag), s, 0.0) for s in sources]
    assert [r is not None for r in routed] == [True] * 4 + [False] * 6
    assert drops(router, "token_clients") == 6
    assert router.from_client(binding(ufrag=ufrag), sources[0], 0.1)[0] == T1  # its own: fine
    for _ in range(100):  # the unanswered ones go; the token may serve others again
        router.expire(6.0)
    assert router.from_client(binding(ufrag=ufrag), sources[9], 6.0)[0] == T1


def test_new_flows_are_rate_limited_per_source_prefix(table):
    router = make_router(table, new_flow_rate=2, new_flow_burst=3)
    same_24 = [(f"203.0.113.{i}", 5000) for i in range(1, 10)]
    admitted = [router.from_client(binding(), s, 0.0) is not None for s in same_24]
    assert admitted == [True] * 3 + [False] * 6
    assert drops(router, "rate_limited") == 6
    assert router.from_client(binding(), ("203.0.114.1", 5000), 0.0)  # another /24
    assert router.from_client(binding(), same_24[5], 0.5)  # one refilled after 0.5 s
    assert not router.from_client(binding(), same_24[6], 0.5)
    assert router.from_client(b"\x80m", same_24[0], 0.5)  # flows it has are not limited


def test_prefixes_are_24_for_ipv4_and_64_for_ipv6():
    assert prefix_of(("203.0.113.7", 1)) == prefix_of(("203.0.113.200", 9))
    assert prefix_of(("203.0.113.7", 1)) != prefix_of(("203.0.112.7", 1))
    assert prefix_of(("::ffff:203.0.113.7", 1)) == prefix_of(("203.0.113.99", 1))  # dual stack
    assert prefix_of(("2001:db8:1:2::1", 1)) == prefix_of(("2001:db8:1:2:ffff::9", 1))
    assert prefix_of(("2001:db8:1:2::1", 1)) != prefix_of(("2001:db8:1:3::1", 1))


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 3)), max_size=120),
)
def test_a_prefix_never_gets_more_than_its_bucket(rate, burst, steps):
    """In any second a prefix opens at most burst + rate flows; pruning refilled buckets (the
    same as no bucket) changes nothing."""
    limiter = PrefixLimiter(rate, burst, max_prefixes=4)
    now, admitted = 0.0, {}
    for dt, prefix_id in steps:
        now += dt
        prefix = bytes([prefix_id])
        allowed = limiter.allows(prefix, now)
        assert limiter.take(prefix, now) == allowed
        if allowed:
            admitted.setdefault(prefix, []).append(now)
        limiter.prune(now, 2)
    for times in admitted.values():
        for i, start in enumerate(times):
            within = [t for t in times[i:] if t - start <= 1.0]
            assert len(within) <= burst + rate * 1.0 + 1e-9


@given(st.lists(st.binary(min_size=1, max_size=3), max_size=200))
def test_prefix_buckets_are_bounded(prefixes):
    limiter = PrefixLimiter(1.0, 2, max_prefixes=16)
    for i, prefix in enumerate(prefixes):
        limiter.take(prefix, i * 0.01)
        assert len(limiter) <= 16


def test_a_full_shard_makes_room_from_flows_never_answered(table):
    full = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 1, 16)
    try:
        router = make_router(full, new_flow_rate=0)
        for i in range(16):
            router.from_client(binding(), (f"192.0.2.{i}", 1), 0.0)
        for i in range(8):  # half of them are calls: their transceiver answered
            answer(router, (f"192.0.2.{i}", 1), 0.1)
        honest = [router.from_client(binding(), (f"198.51.100.{i}", 1), 0.2) for i in range(8)]
        assert all(honest) and router.counters()["flows_evicted"] == 8
        assert all(router.from_client(b"\x80m", (f"192.0.2.{i}", 1), 0.3) for i in range(8))
        assert not any(router.from_client(b"\x80m", (f"192.0.2.{i}", 1), 0.3) for i in range(8, 16))
        for i in range(8):  # every flow in the shard now carried return traffic or is new
            answer(router, (f"198.51.100.{i}", 1), 0.4)
        assert router.from_client(binding(), ("203.0.113.1", 1), 0.5) is None
        assert drops(router, "table_full") == 1
    finally:
        full.close()
        full.unlink()


def test_junk_keeps_no_flow_alive_return_traffic_does(table):
    router = make_router(table, idle_timeout=20, unanswered_timeout=5)
    call, squatter = ("192.0.2.1", 1), ("192.0.2.2", 1)
    router.from_client(binding(), call, 0.0)
    router.from_client(binding(), squatter, 0.0)
    expired = []
    for t in range(1, 40):
        router.from_client(b"\x80keepalive", call, float(t))
        router.from_client(b"\x80keepalive", squatter, float(t))
        if t <= 15:
            answer(router, call, float(t))  # the call's transceiver talks until t=15
        router.flush(float(t))
        for _ in range(10):
            expired += [(c, t) for c in router.expire(float(t))]
    assert dict(expired) == {squatter: 6, call: 36}  # 5 s unanswered; 20 s after the last answer


# Rebinding -----------------------------------------------------------------------------------


def test_an_established_flow_is_not_rebound_by_one_packet(table):
    router = make_router(table, rebind_after=10)
    router.from_client(binding(T1), CLIENT, 0.0)
    answer(router, CLIENT, 0.01)
    assert router.from_client(binding(T2), CLIENT, 0.02) is None  # before any flush, too
    router.flush(0.1)
    assert router.from_client(binding(T2), CLIENT, 5.0) is None
    assert drops(router, "rebind_refused") == 2
    assert router.from_client(b"\x80m", CLIENT, 5.0)[0] == T1
    assert router.from_transceiver(envelope.pack(CLIENT, b"\x80r"), T1, 5.0)  # still its flow
    router.flush(5.0)
    assert router.from_client(binding(T2), CLIENT, 14.0) is None  # 9 s since T1 last spoke
    assert router.from_client(binding(T2), CLIENT, 15.5)[0] == T2  # the old call is over
    assert router.counters()["flows_rebound"] == 1
    assert router.from_transceiver(envelope.pack(CLIENT, b"x"), T1, 15.5) is None


def test_a_flow_never_answered_may_be_rebound(table):
    router = make_router(table)
    router.from_client(binding(T1), CLIENT, 0.0)
    assert router.from_client(binding(T2), CLIENT, 1.0)[0] == T2
    assert router.from_client(b"\x80m", CLIENT, 1.0)[0] == T2
    assert router.counters()["flows_rebound"] == 1
    assert router.from_transceiver(envelope.pack(CLIENT, b"x"), T1, 1.0) is None


# Adoption and the cost of junk ---------------------------------------------------------------


def test_flows_of_another_worker_are_adopted_while_workers_start(table):
    first = make_router(table)
    first.from_client(binding(T1), CLIENT, 0.0)
    second = make_router(table, 1, now=0.5)  # a worker starting: clients may have moved
    assert second.from_client(b"\x80m", CLIENT, 0.5)[0] == T1
    assert second.counters()["flows_adopted"] == 1
    assert table.lookup_in(1, CLIENT).transceiver == T1
    assert second.from_transceiver(envelope.pack(CLIENT, b"r"), T1, 0.5) == (CLIENT, b"r")


def test_junk_from_unknown_addresses_searches_no_shard_in_steady_state(table):
    first, second = make_router(table), make_router(table, 1)
    first.from_client(binding(T1), CLIENT, 0.0)
    for i in range(200):
        assert second.from_client(b"\x80junk", (f"10.9.{i}.1", i + 1), LATER) is None
        assert second.from_client(b"\x17junk", (f"10.9.{i}.1", i + 1), LATER) is None
        assert second.from_client(b"\xffjunk", (f"10.9.{i}.1", i + 1), LATER) is None
    counters = second.counters()
    assert counters["shard_searches"] == 0
    assert (counters["drop_unknown_flow"], counters["drop_unknown_protocol"]) == (400, 200)
    assert second.from_client(b"\x80" * (MAX_DATAGRAM + 1), ("10.9.0.1", 1), LATER) is None
    assert drops(second, "oversize") == 1  # counted as what it is, junk or not
    assert second.from_client(b"\x80m", CLIENT, LATER) is None  # no worker started lately
    make_router(table, 1, now=LATER)  # ...until one does (here: a restarted worker 1)
    assert second.from_client(b"\x80m", CLIENT, LATER + 1)[0] == T1
    assert second.counters()["shard_searches"] == 1
    assert second.from_client(b"\x80m", ("10.9.0.1", 1), LATER + ADOPT_WINDOW + 1.1) is None
    assert second.counters()["shard_searches"] == 1  # the window closed again


def test_a_restarted_worker_reloads_its_shard(table):
    make_router(table).from_client(binding(T1), CLIENT, 0.0)
    reborn = make_router(table, now=LATER)
    assert reborn.from_client(b"\x80m", CLIENT, LATER + ADOPT_WINDOW + 1)[0] == T1
    assert reborn.counters()["flows_adopted"] == 0  # its own shard: not another worker's
    assert reborn.counters()["shard_searches"] == 0


def test_counters_reach_shared_memory_only_on_flush(table):
    router = make_router(table)
    router.from_client(binding(T1), CLIENT, 0.0)
    router.flush(0.0)
    for _ in range(5):
        router.from_client(b"\x80m", CLIENT, 1.0)
    answer(router, CLIENT, 1.5)
    assert table.lookup(CLIENT)[1].packets_in == 1  # the hot path wrote nothing
    router.flush(2.0)
    record = table.lookup(CLIENT)[1]
    assert (record.packets_in, record.packets_out, record.last_seen) == (6, 1, 2.0)


def test_idle_flows_expire_active_ones_stay(table):
    router = make_router(table, idle_timeout=5.0, unanswered_timeout=5.0)
    router.from_client(binding(T1), CLIENT, 0.0)
    router.from_client(binding(T2), ("192.0.2.2", 2), 0.0)
    router.flush(0.0)
    router.from_client(b"\x80m", CLIENT, 4.0)
    answer(router, CLIENT, 4.0)
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
        router = make_router(t)
        router.from_client(binding(T1), CLIENT, 0.0)
        router.from_client(data, source, 0.0)
        router.from_client(data, CLIENT, 0.0)
        router.from_transceiver(data, T1, 0.0)
        assert router.from_client(b"\x80ok", CLIENT, 0.0)[0] == T1
    finally:
        t.close()
        t.unlink()


# The router as a state machine ---------------------------------------------------------------

CLIENTS = [(f"192.0.{i % 3}.{i}", 1000 + i) for i in range(8)]
TRANSCEIVERS = [T1, T2]


class RouterMachine(RuleBasedStateMachine):
    """Clients open, use and lose flows with a few tokens while time passes; after every step
    the router's maps agree with each other and with its shard, and admission holds."""

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 2, 16)
        self.router = make_router(
            self.table,
            token_clients=2,
            new_flow_rate=1,
            new_flow_burst=3,
            idle_timeout=6,
            unanswered_timeout=2,
            rebind_after=3,
        )
        self.tokens = [token(t, issued=WALL + 5 * i) for i in range(3) for t in TRANSCEIVERS]
        self.now = 0.0
        self.answered_at: dict[tuple, float] = {}  # client -> last answer (the model)

    @rule(c=st.sampled_from(CLIENTS), k=st.integers(0, 5))
    def check(self, c, k):
        r, ufrag = self.router, self.tokens[k].encode()
        before = r.flows.get(c)
        users = len(r.by_token.get(ufrag, ()))
        opened = r.events["flows_created"] + r.events["flows_rebound"]
        routed = r.from_client(binding(ufrag=self.tokens[k]), c, self.now)
        if r.events["flows_created"] + r.events["flows_rebound"] > opened:
            assert users < 2  # a token opens flows for token_clients addresses at most
        after = r.flows.get(c)
        if before is not None and routed is not None and after.transceiver != before.transceiver:
            last = self.answered_at.get(c)  # a rebind: never within rebind_after of an answer
            assert last is None or self.now - last > 3

    @rule(c=st.sampled_from(CLIENTS), first=st.sampled_from([0x80, 0x17, 0x05]))
    def media(self, c, first):
        self.router.from_client(bytes([first]) + b"m", c, self.now)

    @rule(c=st.sampled_from(CLIENTS), t=st.sampled_from(TRANSCEIVERS))
    def reply(self, c, t):
        if self.router.from_transceiver(envelope.pack(c, b"\x80r"), t, self.now):
            self.answered_at[c] = self.now

    @rule(dt=st.sampled_from([0.05, 0.5, 1.0, 2.5]))
    def tick(self, dt):
        self.now += dt
        self.router.flush(self.now)
        self.router.expire(self.now)

    @invariant()
    def maps_agree(self):
        r = self.router
        assert set(r.by_peer.values()) == set(r.flows.values()) == set(r.by_header.values())
        assert set(r.unanswered) <= set(r.flows.values())
        assert all(f.packets_out == 0 or f.flushed_out != f.packets_out for f in r.unanswered)
        tagged = [f for flows in r.by_token.values() for f in flows]
        assert len(tagged) == len(set(tagged)) and set(tagged) <= set(r.flows.values())
        assert all(r.by_token.values())
        assert r.writer.used >= len(r.flows)
        for client, flow in r.flows.items():
            record = self.table.lookup_in(0, client)
            assert record is not None and record.transceiver == flow.transceiver

    def teardown(self):
        self.table.close()
        self.table.unlink()


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
