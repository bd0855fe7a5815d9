"""The global hop: an edge relay forwarding to another cluster's relay, with pure routers on real
shared-memory tables and a fake clock (no sockets). Also the `--cluster-routes` configuration."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicerelay.config import ConfigError
from voicerelay.relay.config import RelayConfig, parse_cluster_routes
from voicerelay.relay.router import RelayRouter
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import sockaddr
from voicerelay.wire.token import TokenKeys

KEYS = TokenKeys({0: os.urandom(32)}, 0)  # the key set every cluster shares
WALL = 1_700_000_000.0
LATER = 10.0  # past the adoption window every router starts with
EDGE, HOME = 1, 2  # cluster ids
HOME_INGRESS = ("10.90.2.1", 3478)  # the home cluster's relay (public port)
EDGE_W0, EDGE_W1 = ("10.90.1.1", 40000), ("10.90.1.1", 40001)  # edge workers' internal sockets
STRANGER = ("10.90.9.9", 40000)  # another host
T_HOME, T_OTHER = ("10.90.2.10", 5001), ("10.90.2.11", 5001)
CLIENT = ("198.51.100.7", 40000)


def binding(cluster=HOME, transceiver=T_HOME, issued=WALL, ufrag=None) -> bytes:
    """A Binding request whose server ufrag is `ufrag`, else a new token."""
    ufrag = ufrag or KEYS.seal(cluster, transceiver, issued)
    return stun.build(
        stun.BINDING_REQUEST, os.urandom(12), [(stun.ATTR_USERNAME, f"{ufrag}:c".encode())]
    )


def peer(addr) -> bytes:
    return sockaddr(addr, socket.AF_INET)


def make_table():
    return FlowTable.create(f"vr-hop-{uuid.uuid4().hex[:12]}", 2, 64)


@pytest.fixture
def tables():
    made = [make_table(), make_table()]
    yield made
    for t in made:
        t.close()
        t.unlink()


def edge_router(table, **options) -> RelayRouter:
    routes = {HOME: HOME_INGRESS, 3: ("10.90.3.1", 3478)}
    return RelayRouter(
        KEYS, table, 0, cluster_id=EDGE, cluster_routes=routes, wall_offset=WALL, **options
    )


UPSTREAMS = (ipaddress.ip_network("10.90.0.0/16"),)  # the home relay's --hop-peers


def home_router(table, shard=0, **options) -> RelayRouter:
    routes = {EDGE: ("10.90.1.1", 3478), 3: ("10.90.3.1", 3478)}
    options.setdefault("hop_peers", UPSTREAMS)
    return RelayRouter(
        KEYS, table, shard, cluster_id=HOME, cluster_routes=routes, wall_offset=WALL, **options
    )


def hop_in(home, env: bytes, upstream=EDGE_W0, now=LATER):
    """An edge worker's envelope arriving at the home relay's public socket."""
    return home.client_datagram(env, peer(upstream), now)


def drops(router, reason) -> int:
    return router.counters()[f"drop_{reason}"]


def open_call(edge, home, now=LATER):
    """Client -> edge -> home -> transceiver: the call's first Binding request."""
    dest, env = edge.from_client(binding(), CLIENT, now)
    assert dest == HOME_INGRESS and envelope.unpack_header(env) == CLIENT
    routed = hop_in(home, env, now=now)
    assert routed is not None and routed[0] == peer(T_HOME)
    return routed[1]


def test_a_call_crosses_one_hop_and_replies_come_back_the_same_way(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    assert envelope.unpack_header(open_call(edge, home)) == CLIENT
    # Media: the home relay passes the edge's envelope on unchanged.
    _, env = edge.from_client(b"\x80media", CLIENT, LATER)
    assert hop_in(home, env) == (peer(T_HOME), envelope.pack(CLIENT, b"\x80media"))
    # Replies: transceiver -> home relay -> the edge worker that forwarded -> client.
    back = home.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), T_HOME, LATER)
    assert back == (EDGE_W0, envelope.pack(CLIENT, b"\x80reply"))
    assert edge.from_transceiver(back[1], HOME_INGRESS, LATER) == (CLIENT, b"\x80reply")
    edge.flush(LATER)
    assert edge.counters()["hops_out"] == 2
    assert home.counters()["hops_in"] == 2 and home.counters()["hops_back"] == 1
    # The edge's flow is an ordinary one (shared memory); the home relay's stays local.
    assert tables[0].lookup(CLIENT)[1].transceiver == HOME_INGRESS
    assert tables[1].lookup(CLIENT) is None


def test_a_second_hop_is_refused_so_routes_cannot_loop(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    # Misconfigured: the edge forwards cluster 3 to the home relay, which routes 3 onwards.
    _, env = edge.from_client(binding(cluster=3), CLIENT, LATER)
    assert hop_in(home, env) is None
    assert drops(home, "hop_limit") == 1
    # Even a token of the edge's own cluster (home routes it back to the edge) stops there.
    to_edge = envelope.pack(CLIENT, binding(cluster=EDGE))
    assert hop_in(home, to_edge) is None
    assert drops(home, "hop_limit") == 2
    home.flush(LATER)
    assert home.counters()["hops_in"] == 0 and home.counters()["flows"] == 0


def test_hop_limit_zero_turns_the_hop_off_both_ways(tables):
    edge = edge_router(tables[0], hop_limit=0)
    home = home_router(tables[1], hop_limit=0)
    assert edge.from_client(binding(), CLIENT, LATER) is None
    assert drops(edge, "foreign_cluster") == 1
    assert hop_in(home, envelope.pack(CLIENT, binding())) is None
    assert home.counters()["flows"] == 0


def test_replies_go_only_to_the_upstream_that_forwarded_the_flow(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    open_call(edge, home)
    reply = envelope.pack(CLIENT, b"\x80reply")
    assert home.from_transceiver(reply, T_OTHER, LATER) is None  # not the bound transceiver
    assert drops(home, "return_wrong_transceiver") == 1
    assert (
        home.from_transceiver(envelope.pack(("198.51.100.8", 1), b"\x80x"), T_HOME, LATER) is None
    )
    assert drops(home, "return_no_flow") == 1
    assert home.from_transceiver(envelope.pack(CLIENT, b"\x80" * 1600), T_HOME, LATER) is None
    assert drops(home, "oversize") == 1
    # The edge takes replies for its flow only from the home ingress.
    assert edge.from_transceiver(reply, ("10.90.3.1", 3478), LATER) is None
    assert drops(edge, "return_wrong_transceiver") == 1


def test_another_host_cannot_take_an_established_hop_flow(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    open_call(edge, home)
    assert home.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), T_HOME, LATER)
    home.flush(LATER)
    media = envelope.pack(CLIENT, b"\x80spoof")
    assert hop_in(home, media, upstream=STRANGER) is None
    assert drops(home, "unknown_flow") == 1
    assert hop_in(home, envelope.pack(CLIENT, binding()), upstream=STRANGER) is None
    assert drops(home, "rebind_refused") == 1
    back = home.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), T_HOME, LATER + 0.1)
    assert back[0] == EDGE_W0


def test_another_worker_of_the_same_upstream_host_takes_the_flow_over(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    open_call(edge, home)
    media = envelope.pack(CLIENT, b"\x80media")
    assert hop_in(home, media, upstream=EDGE_W1) == (peer(T_HOME), media)
    back = home.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), T_HOME, LATER)
    assert back[0] == EDGE_W1
    assert hop_in(home, media, upstream=EDGE_W0) is not None  # and back again


def test_a_restarted_edge_worker_keeps_the_hop_flow(tables):
    edge, home = edge_router(tables[0]), home_router(tables[1])
    open_call(edge, home)
    edge.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), HOME_INGRESS, LATER)
    edge.flush(LATER)
    restarted = edge_router(tables[0])  # same shard, same table: the worker came back
    assert restarted.from_client(b"\x80media", CLIENT, LATER + 1) == (
        HOME_INGRESS,
        envelope.pack(CLIENT, b"\x80media"),
    )
    # A reply reaching a worker that does not know the flow yet still finds the client.
    other = edge_router(tables[0])
    assert other.from_transceiver(envelope.pack(CLIENT, b"\x80r"), HOME_INGRESS, LATER + 1) == (
        CLIENT,
        b"\x80r",
    )


def test_a_restarted_home_worker_takes_the_flow_up_at_the_next_consent_check(tables):
    home = home_router(tables[1])
    ufrag = KEYS.seal(HOME, T_HOME, WALL)
    assert hop_in(home, envelope.pack(CLIENT, binding(ufrag=ufrag))) is not None
    home.from_transceiver(envelope.pack(CLIENT, b"\x80reply"), T_HOME, LATER)
    home.flush(LATER)  # marks the token in use
    restarted = home_router(tables[1])
    later = LATER + 60  # the token is long past its first-use window
    media = envelope.pack(CLIENT, b"\x80media")
    assert hop_in(restarted, media, now=later) is None  # no reply sent straight to the client
    assert restarted.from_transceiver(media, T_HOME, later) is None
    check = envelope.pack(CLIENT, binding(ufrag=ufrag))  # the session's token again
    check_at = LATER + 25  # token past its window, within the idle timeout of the last reply
    assert hop_in(restarted, check, now=check_at)[0] == peer(T_HOME)
    assert hop_in(restarted, media, now=check_at) == (peer(T_HOME), media)


def test_hop_flows_expire_like_any_flow(tables):
    home = home_router(tables[1], idle_timeout=5.0, unanswered_timeout=2.0)
    assert hop_in(home, envelope.pack(CLIENT, binding())) is not None
    home.expire(LATER + 1.5)
    assert home.counters()["flows"] == 1
    home.expire(LATER + 3)
    assert home.counters()["flows"] == 0
    assert home.from_transceiver(envelope.pack(CLIENT, b"\x80r"), T_HOME, LATER + 3) is None


def test_a_client_address_is_either_direct_or_through_a_hop(tables):
    home = home_router(tables[1])
    assert hop_in(home, envelope.pack(CLIENT, binding())) is not None
    assert home.from_client(binding(), CLIENT, LATER) is None
    assert drops(home, "address_in_use") == 1
    direct = home_router(tables[1], shard=1)
    other = ("198.51.100.9", 1)
    assert direct.from_client(binding(), other, LATER) is not None
    assert hop_in(direct, envelope.pack(other, binding())) is None
    assert drops(direct, "address_in_use") == 1


def test_bad_envelopes_from_upstream_are_counted(tables):
    home = home_router(tables[1])
    assert hop_in(home, b"VR") is None
    assert hop_in(home, b"VR\x09" + bytes(19) + b"\x80") is None
    assert hop_in(home, envelope.pack(CLIENT, b"")) is None
    assert hop_in(home, envelope.pack(CLIENT, b"\x50junk")) is None
    assert hop_in(home, envelope.pack(CLIENT, b"\x80" * 1600)) is None
    counters = home.counters()
    assert counters["drop_envelope_malformed"] == 1
    assert counters["drop_envelope_version"] == 1
    assert counters["drop_malformed"] == 1
    assert counters["drop_unknown_protocol"] == 1
    assert counters["drop_oversize"] == 1


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=1600),
    st.sampled_from([EDGE_W0, STRANGER]),
    st.sampled_from([CLIENT, ("2001:db8::7", 40000)]),
)
def test_no_upstream_input_makes_the_router_raise(payload, upstream, client):
    table = make_table()
    try:
        home = home_router(table)
        assert home.tcp_datagram(binding(), peer(("198.51.100.50", 1)), LATER)  # a TCP flow
        for data in (
            b"V" + payload,
            envelope.pack(client, payload),
            envelope.pack(client, binding()),
        ):
            routed = hop_in(home, data, upstream=upstream)
            assert routed is None or routed[0] == peer(T_HOME)
    finally:
        table.close()
        table.unlink()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([EDGE_W0, EDGE_W1, STRANGER]), st.booleans(), st.booleans()),
        max_size=12,
    )
)
def test_replies_follow_the_upstream_that_last_forwarded_the_flow(steps):
    """Whatever upstreams send (checks or media, answered or not), a reply goes only to the
    upstream whose last datagram for the client was forwarded, and nowhere if none was."""
    table = make_table()
    try:
        home = home_router(table)
        ufrag = KEYS.seal(HOME, T_HOME, WALL)
        owner = None
        now = LATER
        for upstream, is_check, answered in steps:
            now += 0.5
            payload = binding(ufrag=ufrag) if is_check else b"\x80media"
            if hop_in(home, envelope.pack(CLIENT, payload), upstream=upstream, now=now):
                owner = upstream
            back = home.from_transceiver(envelope.pack(CLIENT, b"\x80r"), T_HOME, now)
            assert (back[0] if back else None) == owner
            if answered:
                home.flush(now)
    finally:
        table.close()
        table.unlink()


# Configuration ----------------------------------------------------------------------------


def test_cluster_routes_parse_from_a_flag_or_environment_string():
    assert parse_cluster_routes("2=10.90.2.1:3478, 3=[fd90::1]:3479") == {
        2: ("10.90.2.1", 3478),
        3: ("fd90::1", 3479),
    }
    config = RelayConfig(cluster_id=1, cluster_routes="2=10.90.2.1:3478", hop_limit=1)
    assert config.routes == {2: ("10.90.2.1", 3478)}
    assert RelayConfig.from_json(config.to_json()).routes == config.routes
    assert any(str(n) == "10.90.2.1/32" for n in config.networks)  # snapshots may name it


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ("2=host:3478", "not ID=HOST:PORT"),
        ("2=10.90.2.1", "not ID=HOST:PORT"),
        ("x=10.90.2.1:1", "not ID=HOST:PORT"),
        ("2=10.90.2.1:70000", "not ID=HOST:PORT"),
        ("2=10.90.2.1:1,2=10.90.2.2:1", "twice"),
        ("1=10.90.2.1:1", "own cluster"),
    ],
)
def test_bad_cluster_routes_are_refused_in_one_line(routes, message):
    with pytest.raises(ConfigError, match=message):
        RelayConfig(cluster_id=1, cluster_routes=routes)


def test_hop_limit_is_zero_or_one():
    with pytest.raises(ConfigError, match="hop-limit"):
        RelayConfig(hop_limit=2)


def test_hop_envelopes_are_taken_only_from_the_hop_peers(tables):
    """An envelope names its client: from anyone but a configured upstream relay it would let
    the sender choose the address the new-flow limits are charged to."""
    for home, upstream in (
        (home_router(tables[1], hop_peers=()), EDGE_W0),  # the default: no hop peers
        (home_router(tables[1], hop_peers=(ipaddress.ip_network("10.90.1.0/24"),)), STRANGER),
    ):
        assert hop_in(home, envelope.pack(CLIENT, binding()), upstream=upstream) is None
        assert home.counters()["hops_in"] == 0
