"""Restart recovery with real relay processes, a real redis-server and a streaming client.

The client streams 100 packets/s through the relay to an echoing stand-in transceiver and never
sends another STUN packet: media resumes after a restart only if the flow was restored. Each
test prints the media gap it measured (`pytest -s` shows them)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.support.fastpath import MODES, assert_mode, relay_args, require_mode
from tests.support.media import Probe
from tests.support.procs import RedisServer, RelayProcess, wait_for
from tests.support.standin import StandIn, binding_request
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.snapshot import decode_snapshot, seal_for
from voicerelay.wire.token import load_keys

# Generous: the budget (250 ms) is measured by bench/, not asserted here; these bounds catch
# "did not recover" and "forwarding waited for Redis", not a slow CI machine.
GAP_BOUND = 3.0
OUTAGE_GAP_BOUND = 0.5
SLOW_REDIS_RTT_BOUND = 0.25


@pytest.fixture
def redis_server(tmp_path):
    with RedisServer(tmp_path) as server:
        yield server


def relay_config(relay: RelayProcess) -> RelayConfig:
    return RelayConfig(listen_port=relay.port, state_dir=relay.state_dir, workers=relay.workers)


def redis_key(relay: RelayProcess) -> str:
    return f"voicerelay:0:relay:{relay.port}:flows"


def stream_through(relay: RelayProcess) -> tuple[StandIn, Probe]:
    keys = load_keys(relay.secret_file)
    transceiver = StandIn(echo=True).start()
    probe = Probe(relay.public, interval=0.01)
    probe.send(binding_request(keys, transceiver.addr))
    wait_for(lambda: transceiver.got(probe.addr), 5, what="flow opened")
    return transceiver, probe.start()


def wait_snapshot_with_flow(relay: RelayProcess, flows: int = 1) -> None:
    wait_for(
        lambda: (relay.stats()["snapshot"].get("flows_in_last_snapshot") or 0) >= flows,
        5,
        what="a snapshot holding the flow",
    )


def close(transceiver: StandIn | None, probe: Probe | None, relay: RelayProcess) -> None:
    if probe:
        probe.close()
    if transceiver:
        transceiver.close()
    relay.cleanup()


def backend_args(request: pytest.FixtureRequest, backend: str) -> list[str]:
    if backend == "redis":
        return ["--redis", request.getfixturevalue("redis_server").url]
    return []


@pytest.mark.parametrize("how", MODES)
@pytest.mark.parametrize("backend", ["file", "redis"])
def test_full_restart_keeps_the_session_flowing(tmp_path, request, backend, how):
    require_mode(how)
    extra = [*backend_args(request, backend), *relay_args(how)]
    relay = RelayProcess(tmp_path, workers=2, extra=extra).start()
    assert_mode(relay, how)
    transceiver = probe = None
    try:
        transceiver, probe = stream_through(relay)
        wait_snapshot_with_flow(relay)
        stopped_at = time.monotonic()
        relay.stop()
        assert relay.ctl("status", check=False).returncode != 0  # really down
        relay.start()  # same ports, same state: the client sends no new STUN (no ICE restart)
        wait_for(lambda: probe.echoes_after(stopped_at) >= 20, 5, what="media after the restart")
        gap = probe.silence(since=stopped_at)
        print(f"\nmedia gap across a full relay restart ({backend}): {gap * 1000:.0f} ms")
        assert gap < GAP_BOUND
        assert relay.status()["restored_flows"] >= 1
    finally:
        close(transceiver, probe, relay)


@pytest.mark.parametrize("how", MODES)
@pytest.mark.parametrize("backend", ["file", "redis"])
def test_kill_minus_nine_of_everything_then_start_recovers(tmp_path, request, backend, how):
    require_mode(how)
    extra = [*backend_args(request, backend), *relay_args(how)]
    relay = RelayProcess(tmp_path, workers=2, extra=extra).start()
    assert_mode(relay, how)
    transceiver = probe = None
    try:
        transceiver, probe = stream_through(relay)
        wait_snapshot_with_flow(relay)
        killed_at = time.monotonic()
        relay.kill_all()  # no clean stop: no final snapshot, shared memory left behind
        assert all(os.path.exists(f"/dev/shm/{n}") for n in relay.shm_names)
        relay.start()
        wait_for(lambda: probe.echoes_after(killed_at) >= 20, 5, what="media after the crash")
        gap = probe.silence(since=killed_at)
        print(
            f"\nmedia gap across kill -9 of launcher and workers ({backend}): {gap * 1000:.0f} ms"
        )
        assert gap < GAP_BOUND
        log = (tmp_path / f"relay-{relay.port}.log").read_text()
        assert "cleared stale shared memory" in log
        assert relay.status()["restored_flows"] >= 1
    finally:
        close(transceiver, probe, relay)


def test_redis_stopped_mid_run_never_pauses_forwarding(tmp_path, redis_server):
    relay = RelayProcess(
        tmp_path, workers=2, extra=["--redis", redis_server.url, "--snapshot-interval", "0.2"]
    ).start()
    transceiver = probe = None
    try:
        transceiver, probe = stream_through(relay)
        wait_snapshot_with_flow(relay)
        outage = time.monotonic()
        redis_server.stop()
        wait_for(
            lambda: relay.stats()["snapshot"]["consecutive_failures"] >= 2, 10, what="failures seen"
        )
        human = relay.ctl("stats").stdout  # a person sees the outage in `relayctl stats`
        assert f"snapshot: redis {redis_server.url}" in human and "last error:" in human
        redis_server.start()  # empty: no persistence
        wait_for(
            lambda: relay.stats()["snapshot"]["consecutive_failures"] == 0,
            15,
            what="snapshots resumed",
        )
        resumed = time.monotonic()
        gap = probe.silence(since=outage, until=resumed)
        lost = probe.lost(outage, resumed - 0.1)
        print(f"\nlongest media gap while Redis was down: {gap * 1000:.0f} ms, {lost} lost")
        assert gap < OUTAGE_GAP_BOUND
        assert lost == 0
        assert redis_server.client().exists(redis_key(relay))  # written after the restart
        assert "last error:" not in relay.ctl("stats").stdout
    finally:
        close(transceiver, probe, relay)


def _debug_sleep(server: RedisServer, seconds: float) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: server.client().execute_command("DEBUG", "SLEEP", str(seconds)),
        daemon=True,
    )
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["client-pause", "debug-sleep"])
def test_a_slow_redis_does_not_slow_forwarding(tmp_path, redis_server, how):
    relay = RelayProcess(
        tmp_path, workers=2, extra=["--redis", redis_server.url, "--snapshot-interval", "0.1"]
    ).start()
    transceiver = probe = None
    try:
        transceiver, probe = stream_through(relay)
        wait_snapshot_with_flow(relay)
        baseline = probe.round_trips(0, time.monotonic())
        failures = relay.stats()["snapshot"]["failures"]
        slow_from = time.monotonic()
        if how == "client-pause":
            redis_server.client().execute_command("CLIENT", "PAUSE", "1500", "ALL")
        else:
            sleeper = _debug_sleep(redis_server, 1.5)
        slow_until = slow_from + 1.5
        # The snapshotter really hit the slow server (its writes time out)...
        wait_for(
            lambda: relay.stats()["snapshot"]["failures"] > failures, 3, what="a slow snapshot"
        )
        wait_for(lambda: time.monotonic() > slow_until, 5, what="the slow spell to pass")
        if how == "debug-sleep":
            sleeper.join(5)
        # ...while every packet kept its round trip.
        rtts = probe.round_trips(slow_from, slow_until)
        lost = probe.lost(slow_from, slow_until)
        gap = probe.silence(since=slow_from, until=slow_until)
        print(
            f"\nslow Redis ({how}): max RTT {max(rtts) * 1000:.1f} ms "
            f"(before: {max(baseline) * 1000:.1f} ms), longest gap {gap * 1000:.0f} ms"
        )
        assert len(rtts) > 50 and lost == 0
        assert max(rtts) < SLOW_REDIS_RTT_BOUND
        assert gap < SLOW_REDIS_RTT_BOUND
    finally:
        close(transceiver, probe, relay)


# Damaged snapshots ------------------------------------------------------------------------


def _truncated(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _future_version(blob: bytes) -> bytes:
    return blob[:4] + bytes([99]) + blob[5:]  # the seal header's format version


def _garbage(blob: bytes) -> bytes:
    return b"\xc1not msgpack" + blob[12:]


DAMAGE = {
    "truncated": (_truncated, "refused, starting empty"),
    "unknown-version": (_future_version, "version 99"),
    "garbage": (_garbage, "refused, starting empty"),
}


@pytest.mark.parametrize(
    ("backend", "damages"),
    [("file", list(DAMAGE)), ("redis", ["truncated", "unknown-version"])],
)
def test_damaged_snapshots_are_refused_and_the_relay_serves_new_sessions(
    tmp_path, request, backend, damages
):
    """A real snapshot holding real flows, damaged: each is refused whole (not half loaded),
    with a log line that says so, and the relay starts empty and serves new calls."""
    relay = RelayProcess(tmp_path, workers=2, extra=backend_args(request, backend))
    snapshot_file = tmp_path / f"relay-{relay.port}.snapshot"

    def stored() -> bytes:
        if backend == "redis":
            return request.getfixturevalue("redis_server").client().get(redis_key(relay))
        return snapshot_file.read_bytes()

    def store(blob: bytes) -> None:
        if backend == "redis":
            request.getfixturevalue("redis_server").client().set(redis_key(relay), blob)
        else:
            snapshot_file.write_bytes(blob)

    transceiver = probe = None
    try:
        relay.start()
        transceiver, probe = stream_through(relay)
        wait_snapshot_with_flow(relay)
        relay.stop()  # a clean stop writes the final snapshot
        genuine = stored()
        assert len(decode_snapshot(genuine, 0.0, seal_for(relay_config(relay)))) >= 1
        for name in damages:
            damage, says = DAMAGE[name]
            store(damage(genuine))
            log_file = tmp_path / f"relay-{relay.port}.log"
            log_file.write_text("")
            relay.start()
            assert relay.stats()["table_flows"] == 0, name  # nothing restored, not even part
            assert relay.status()["restored_flows"] == 0, name
            refusal = [ln for ln in log_file.read_text().splitlines() if "refused" in ln]
            assert len(refusal) == 1 and says in refusal[0], (name, refusal)
            fresh_transceiver, fresh = stream_through(relay)  # a new session works
            fresh.close()
            fresh_transceiver.close()
            relay.stop()
        store(genuine)  # and the undamaged snapshot restores, as a control
        relay.start()
        assert relay.status()["restored_flows"] >= 1
    finally:
        close(transceiver, probe, relay)
