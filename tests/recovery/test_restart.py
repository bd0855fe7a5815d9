"""Restart recovery with real relay processes, a real redis-server and a streaming client.

Each test prints the media gap it measured (`pytest -s` shows them)."""

from __future__ import annotations

import time

import pytest

from tests.support.procs import RedisServer, RelayProcess, wait_for
from tests.support.standin import MediaClient, StandIn, binding_request
from voicerelay.wire.token import load_keys

GAP_BOUND = 3.0  # generous: the budget (250 ms) is measured by bench/, not asserted here


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path) as server:
        yield server


def stream_through(relay: RelayProcess) -> tuple[StandIn, MediaClient]:
    keys = load_keys(relay.secret_file)
    transceiver = StandIn(echo=True).start()
    client = MediaClient(relay.public)
    client.send(binding_request(keys, transceiver.addr))
    wait_for(lambda: transceiver.got(client.addr), 5, what="flow opened")
    client.stream(0.02)  # 50 packets/s
    wait_for(lambda: len(client.arrivals) > 10, 5, what="echoes")
    return transceiver, client


def wait_snapshot_with_flow(relay: RelayProcess) -> None:
    wait_for(
        lambda: (relay.stats()["snapshot"].get("flows_in_last_snapshot") or 0) >= 1,
        5,
        what="a snapshot holding the flow",
    )


def echoes_after(client: MediaClient, t: float, count: int = 5) -> bool:
    return sum(1 for a in client.arrivals if a > t) >= count


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_full_restart_keeps_the_session_flowing(tmp_path, request, backend):
    extra = []
    if backend == "redis":
        extra = ["--redis", request.getfixturevalue("redis_server").url]
    relay = RelayProcess(tmp_path, workers=2, extra=extra).start()
    transceiver = client = None
    try:
        transceiver, client = stream_through(relay)
        wait_snapshot_with_flow(relay)
        stopped_at = time.monotonic()
        relay.stop()
        relay.start()  # same ports, same state: no new STUN is sent by the client
        wait_for(lambda: echoes_after(client, stopped_at), 5, what="media after the restart")
        gap = client.max_gap(since=stopped_at - 0.2)
        print(f"\nmedia gap after a full relay restart ({backend}): {gap * 1000:.0f} ms")
        assert gap < GAP_BOUND
        assert relay.status()["restored_flows"] >= 1
    finally:
        if client:
            client.close()
        if transceiver:
            transceiver.close()
        relay.cleanup()


def test_kill_minus_nine_of_everything_then_start_recovers(tmp_path, redis_server):
    relay = RelayProcess(tmp_path, workers=2, extra=["--redis", redis_server.url]).start()
    transceiver = client = None
    try:
        transceiver, client = stream_through(relay)
        wait_snapshot_with_flow(relay)
        killed_at = time.monotonic()
        relay.kill_all()
        assert all(__import__("os").path.exists(f"/dev/shm/{n}") for n in relay.shm_names)  # stale
        relay.start()
        wait_for(lambda: echoes_after(client, killed_at), 5, what="media after the crash")
        gap = client.max_gap(since=killed_at - 0.2)
        print(f"\nmedia gap after kill -9 of launcher and workers (redis): {gap * 1000:.0f} ms")
        assert gap < GAP_BOUND
        log = (tmp_path / f"relay-{relay.port}.log").read_text()
        assert "cleared stale shared memory" in log
    finally:
        if client:
            client.close()
        if transceiver:
            transceiver.close()
        relay.cleanup()


def test_redis_stopped_mid_run_never_pauses_forwarding(tmp_path, redis_server):
    relay = RelayProcess(
        tmp_path, workers=2, extra=["--redis", redis_server.url, "--snapshot-interval", "0.2"]
    ).start()
    transceiver = client = None
    try:
        transceiver, client = stream_through(relay)
        wait_snapshot_with_flow(relay)
        outage = time.monotonic()
        redis_server.stop()
        wait_for(
            lambda: relay.stats()["snapshot"]["consecutive_failures"] >= 2, 10, what="failures seen"
        )
        redis_server.start()
        wait_for(
            lambda: relay.stats()["snapshot"]["consecutive_failures"] == 0,
            15,
            what="snapshots resumed",
        )
        gap = client.max_gap(since=outage)
        print(f"\nlongest media gap while Redis was down: {gap * 1000:.0f} ms")
        assert gap < 0.5
        assert redis_server.client().exists(f"voicerelay:0:relay:{relay.port}:flows")
    finally:
        if client:
            client.close()
        if transceiver:
            transceiver.close()
        relay.cleanup()


def test_a_paused_redis_does_not_slow_forwarding(tmp_path, redis_server):
    relay = RelayProcess(
        tmp_path, workers=2, extra=["--redis", redis_server.url, "--snapshot-interval", "0.1"]
    ).start()
    transceiver = client = None
    try:
        transceiver, client = stream_through(relay)
        paused_at = time.monotonic()
        redis_server.client().execute_command("CLIENT", "PAUSE", "2000", "ALL")
        wait_for(lambda: time.monotonic() > paused_at + 2.2, 5, what="the pause to pass")
        gap = client.max_gap(since=paused_at)
        print(f"\nlongest media gap while Redis was paused: {gap * 1000:.0f} ms")
        assert gap < 0.3
    finally:
        if client:
            client.close()
        if transceiver:
            transceiver.close()
        relay.cleanup()


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_corrupt_snapshot_is_refused_and_the_relay_serves_new_sessions(
    tmp_path, request, backend
):
    relay = RelayProcess(tmp_path, workers=2)
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        relay.extra = ["--redis", server.url]
        server.client().set(f"voicerelay:0:relay:{relay.port}:flows", b"\xc1not msgpack")
    else:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / f"relay-{relay.port}.snapshot").write_bytes(b"\x82\xa6format\xa3bad")
    relay.start()
    transceiver = client = None
    try:
        assert relay.stats()["table_flows"] == 0
        log = (tmp_path / f"relay-{relay.port}.log").read_text()
        assert "refused, starting empty" in log
        transceiver, client = stream_through(relay)  # a new session works
    finally:
        if client:
            client.close()
        if transceiver:
            transceiver.close()
        relay.cleanup()
