"""Snapshot codec, seal and stores (file; Redis as a real redis-server), and the snapshotter's
behaviour when Redis is down, paused, or comes back."""

from __future__ import annotations

import contextlib
import ipaddress
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
    SnapshotSeal,
    Snapshotter,
    decode_flows,
    decode_snapshot,
    encode_flows,
    encode_snapshot,
    restore,
)
from voicerelay.shm.flowtable import FlowRecord, FlowTable

SEAL = SnapshotSeal({1: b"k" * 32}, 1, b"cluster 0 relay port 3478")
ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
addrs = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), st.integers(1, 65535)
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
    blob = encode_snapshot(flows, now=1000.0, seal=SEAL, wall=5000.0)
    back = decode_snapshot(blob, now=2000.0, seal=SEAL, networks=ANYWHERE, wall_now=5000.0)
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
    blob = encode_snapshot(flows, now=100.0, seal=SEAL, wall=1000.0)
    kept = decode_snapshot(blob, now=0.0, seal=SEAL, wall_now=1010.0, idle_timeout=15.0)
    assert [r.client for r in kept] == [("10.0.0.1", 1)]  # 1 s idle + 10 s down < 15 s


@given(st.binary(max_size=200))
def test_garbage_raises_only_snapshot_error(blob):
    with contextlib.suppress(SnapshotError):
        decode_snapshot(blob, 0.0, SEAL)
    with contextlib.suppress(SnapshotError):
        decode_flows(blob, 0.0)


@given(st.data())
def test_truncated_snapshots_are_refused_whole(data):
    flows = [FlowRecord(("10.0.0.1", 1), ("127.0.0.1", 5), 1.0)] * 3
    blob = encode_snapshot(flows, 1.0, SEAL)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(SnapshotError):
        decode_snapshot(blob[:cut], 1.0, SEAL)
    body = encode_flows(flows, 1.0)
    with pytest.raises(SnapshotError):
        decode_flows(body[: data.draw(st.integers(0, len(body) - 1))], 1.0)


def _body(flows: list, v: int = 2) -> bytes:
    return msgpack.packb({"format": "voicerelay-flows", "v": v, "wall": 0, "flows": flows})


def test_unknown_versions_and_damaged_flows_are_refused():
    with pytest.raises(SnapshotError, match="version 3"):
        decode_flows(_body([], v=3), 0)
    with pytest.raises(SnapshotError, match="flow 0 has a bad address"):
        decode_flows(_body([["10.0.0.1", 1, "not-an-ip", 5, 0.0, 0, 0]]), 0)
    with pytest.raises(SnapshotError, match="flow 1 is damaged"):  # port 0 is nobody's
        decode_flows(
            _body([["10.0.0.1", 1, "10.0.0.2", 5, 0.0, 0, 0]] + [["::1", 0] * 2 + [0, 0, 0]]), 0
        )


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
    assert Snapshotter(table, store, SEAL, clock=lambda: 12.0).snapshot_once()
    fresh = FlowTable.create(f"vr-test-{uuid.uuid4().hex[:12]}", 3, 64)
    try:
        assert restore(fresh, store, 50.0, SEAL).restored == 2
        assert fresh.lookup(("::1", 2))[1].transceiver == ("127.0.0.1", 6)
        assert fresh.lookup(("10.0.0.1", 1))[1].last_seen == pytest.approx(48.0, abs=0.5)
        assert restore(fresh, store, 50.0, SEAL).restored == 0  # never over a non-empty table
    finally:
        fresh.close()
        fresh.unlink()


def test_corrupt_file_is_refused_with_a_log_line(tmp_path, table, caplog):
    store = FileStore(tmp_path / "snap")
    (tmp_path / "snap").write_bytes(b"\x93garbage")
    with caplog.at_level(logging.ERROR, "voicerelay.snapshot"):
        result = restore(table, store, 0.0, SEAL)
    assert result.restored == 0 and "not sealed" in result.refused
    assert "refused" in caplog.text and table.count() == 0


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path) as server:
        yield server


def test_redis_store_round_trip_with_expiry(redis_server, table):
    store = RedisStore(redis_server.url, "voicerelay:0:relay:1:flows", ttl=77)
    table.shard(0).put(("10.0.0.1", 1), ("127.0.0.1", 5), 1.0)
    assert Snapshotter(table, store, SEAL, clock=lambda: 1.0).snapshot_once()
    client = redis_server.client()
    assert 0 < client.ttl("voicerelay:0:relay:1:flows") <= 77
    assert [r.client for r in decode_snapshot(store.load(), 1.0, SEAL)] == [("10.0.0.1", 1)]
    assert b"10.0.0.1" not in client.get("voicerelay:0:relay:1:flows")  # addresses sealed


def test_redis_down_then_back_snapshotter_backs_off_and_resumes(redis_server, table, caplog):
    store = RedisStore(redis_server.url, "k", ttl=60)
    snapper = Snapshotter(table, store, SEAL, interval=0.05)
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
    ok = Snapshotter(table, store, SEAL).snapshot_once()
    assert not ok and time.monotonic() - started < 1.5


def test_snapshotter_thread_does_not_hold_up_its_caller(redis_server, table):
    store = RedisStore(redis_server.url, "k", ttl=60, timeout=2.0)
    redis_server.client().execute_command("DEBUG", "SLEEP", "0")  # debug command available
    snapper = Snapshotter(table, store, SEAL, interval=0.05)
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


# The seal --------------------------------------------------------------------------------------

FLOWS = [
    FlowRecord(("198.51.100.7", 40000), ("10.1.2.3", 5000), 1.0),
    FlowRecord(("2001:db8::7", 40001), ("fd00::5", 5000), 1.0),
]


@given(st.data())
def test_any_changed_byte_is_refused_whole(data):
    blob = bytearray(encode_snapshot(FLOWS, 1.0, SEAL))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SnapshotError):
        decode_snapshot(bytes(blob), 1.0, SEAL)


def test_an_unsealed_snapshot_is_refused_even_if_well_formed():
    """What version 1 wrote, and what anyone who can write the file or the key can forge."""
    forged = msgpack.packb(
        {
            "format": "voicerelay-flows",
            "v": 1,
            "wall": 0,
            "flows": [["198.51.100.7", 1, "203.0.113.9", 53, 0.0, 0, 0]],
        }
    )
    with pytest.raises(SnapshotError, match="not sealed with the cluster secret"):
        decode_snapshot(forged, 0.0, SEAL)


def test_another_secret_or_another_relay_does_not_open_a_snapshot():
    blob = encode_snapshot(FLOWS, 1.0, SEAL)
    other_secret = SnapshotSeal({1: b"x" * 32}, 1, SEAL.context)
    other_relay = SnapshotSeal({1: b"k" * 32}, 1, b"cluster 0 relay port 3479")
    for seal in (other_secret, other_relay):
        with pytest.raises(SnapshotError, match="does not verify"):
            decode_snapshot(blob, 1.0, seal)


def test_the_seal_key_is_derived_not_the_token_key_itself():
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = encode_snapshot(FLOWS, 1.0, SEAL)
    header, nonce, sealed = blob[:6], blob[6:18], blob[18:]
    with pytest.raises(InvalidTag):
        AESGCM(b"k" * 32).decrypt(nonce, sealed, header + SEAL.context)


def test_key_rotation_keeps_opening_older_snapshots_until_the_old_key_goes():
    old = SnapshotSeal({1: b"k" * 32}, 1, b"ctx")
    rotated = SnapshotSeal({2: b"n" * 32, 1: b"k" * 32}, 2, b"ctx")  # new first line, old kept
    retired = SnapshotSeal({2: b"n" * 32}, 2, b"ctx")
    before = encode_snapshot(FLOWS, 1.0, old)
    assert len(decode_snapshot(before, 1.0, rotated)) == 2
    after = encode_snapshot(FLOWS, 1.0, rotated)
    assert after[5] == 2  # sealed with the new key id
    assert len(decode_snapshot(after, 1.0, retired)) == 2
    with pytest.raises(SnapshotError, match="key id 1, which the cluster secret does not hold"):
        decode_snapshot(before, 1.0, retired)


def test_an_unknown_seal_version_is_named():
    blob = bytearray(encode_snapshot(FLOWS, 1.0, SEAL))
    blob[4] = 99
    with pytest.raises(SnapshotError, match="version 99"):
        decode_snapshot(bytes(blob), 1.0, SEAL)


def test_client_addresses_are_not_readable_in_a_snapshot():
    blob = encode_snapshot(FLOWS, 1.0, SEAL)
    assert b"198.51.100.7" not in blob and b"2001:db8::7" not in blob


# Transceiver networks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transceiver", "networks", "ok"),
    [
        ("10.1.2.3", None, True),
        ("192.168.0.9", None, True),
        ("fd12::1", None, True),
        ("127.0.0.1", None, True),
        ("203.0.113.9", None, False),  # public: never by default
        ("2001:db8::1", None, False),
        ("::ffff:203.0.113.9", None, False),  # IPv4-mapped: the IPv4 it reaches counts
        ("::ffff:10.0.0.1", None, True),
        ("10.1.2.3", ["10.9.0.0/16"], False),
        ("203.0.113.9", ["203.0.113.0/24"], True),  # an operator may list public networks
    ],
)
def test_transceivers_outside_the_networks_refuse_the_snapshot(transceiver, networks, ok):
    flows = [FlowRecord(("198.51.100.7", 1), (transceiver, 5000), 1.0)]
    kwargs = {} if networks is None else {"networks": [ipaddress.ip_network(n) for n in networks]}
    blob = encode_snapshot(flows, 1.0, SEAL)
    if ok:
        assert len(decode_snapshot(blob, 1.0, SEAL, **kwargs)) == 1
    else:
        with pytest.raises(SnapshotError, match="outside --transceiver-networks"):
            decode_snapshot(blob, 1.0, SEAL, **kwargs)


def test_one_bad_transceiver_refuses_the_whole_snapshot(tmp_path, table):
    flows = [*FLOWS, FlowRecord(("198.51.100.8", 1), ("8.8.8.8", 53), 1.0)]
    store = FileStore(tmp_path / "snap")
    store.save(encode_snapshot(flows, 1.0, SEAL))
    result = restore(table, store, 1.0, SEAL)
    assert result.restored == 0 and "flow 2 names transceiver 8.8.8.8:53" in result.refused
    assert table.count() == 0


# Files -----------------------------------------------------------------------------------------


def test_the_snapshot_file_is_private_even_over_an_old_world_readable_one(tmp_path):
    path = tmp_path / "relay.snapshot"
    for stale in (path, tmp_path / "relay.snapshot.tmp"):
        stale.write_bytes(b"old")
        stale.chmod(0o644)
    FileStore(path).save(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


def test_a_file_larger_than_the_table_could_hold_is_refused_unread(tmp_path, table):
    path = tmp_path / "snap"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(SnapshotError, match="larger than"):
        FileStore(path, max_bytes=4096).load()


def test_the_seal_comes_from_the_relays_secret_file(tmp_path):
    from voicerelay.config import ConfigError
    from voicerelay.relay.config import RelayConfig
    from voicerelay.relay.snapshot import seal_for
    from voicerelay.wire.token import write_new_secret

    config = RelayConfig(state_dir=tmp_path, workers=1)
    write_new_secret(config.secret_path, key_id=7)
    blob = encode_snapshot(FLOWS, 1.0, seal_for(config))
    assert blob[5] == 7 and len(decode_snapshot(blob, 1.0, seal_for(config))) == 2
    config.secret_path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ConfigError, match="snapshots cannot be sealed: .* is not text"):
        seal_for(config)
