"""The launcher keeps every worker slot filled however often its worker dies."""

from __future__ import annotations

import os
import signal

from tests.support.procs import RelayProcess, alive, wait_for


def test_a_worker_killed_again_and_again_is_replaced_every_time(tmp_path):
    with RelayProcess(tmp_path, workers=2) as relay:
        for kill in range(1, 6):
            victim = relay.status()["workers"][0]
            os.kill(victim["pid"], signal.SIGKILL)

            def replaced(pid: int = victim["pid"]) -> dict | None:
                w = relay.status()["workers"][0]
                return w if w["alive"] and w["pid"] != pid else None

            back = wait_for(replaced, 2.0, what=f"worker 0 replaced after kill {kill}")
            assert back["restarts"] == kill
            wait_for(lambda p=victim["pid"]: not alive(p), 2.0, what="the killed pid reaped")
        other = relay.status()["workers"][1]
        assert other["alive"] and other["restarts"] == 0


def test_after_a_worker_kill_the_table_settles_to_one_entry_per_client(tmp_path):
    """Clients that change worker are adopted; the copies they leave behind are swept."""
    from tests.support.standin import MediaClient, StandIn, binding_request
    from voicerelay.wire.token import load_keys

    # A small shard is swept whole every tick; the idle timeout is far beyond the test.
    extra = ["--idle-timeout", "120", "--capacity", "64"]
    with RelayProcess(tmp_path, workers=2, extra=extra) as relay:
        keys = load_keys(relay.secret_file)
        transceiver = StandIn(echo=True).start()
        clients = [MediaClient(relay.public) for _ in range(12)]
        try:
            for client in clients:
                client.send(binding_request(keys, transceiver.addr))
                client.stream(0.02)
            wait_for(lambda: relay.stats()["table_flows"] == 12, 5, what="12 flows")
            os.kill(relay.status()["workers"][0]["pid"], signal.SIGKILL)
            wait_for(
                lambda: relay.status()["workers"][0]["restarts"] == 1, 2, what="worker replaced"
            )
            wait_for(
                lambda: all(len(c.arrivals) > 0 for c in clients), 2, what="echoes after the kill"
            )
            # A sweep of the shard (here every tick) after the one-second silence rule.
            wait_for(
                lambda: relay.stats()["table_flows"] == 12, 4, 0.1, what="one entry per client"
            )
            echoed = [len(c.arrivals) for c in clients]
            wait_for(
                lambda: all(len(c.arrivals) > n + 10 for c, n in zip(clients, echoed, strict=True)),
                3,
                what="every client still echoed after the sweep",
            )
        finally:
            for client in clients:
                client.close()
            transceiver.close()


def test_shared_memory_held_by_a_live_process_is_a_one_line_error(tmp_path):
    import subprocess

    from tests.support.procs import RELAYCTL, free_ports
    from voicerelay.shm.flowtable import FlowTable

    port = free_ports(1)
    held = FlowTable.create(f"voicerelay-{port}-flows", 1, 16)  # this test process owns it
    try:
        env = {**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)}
        result = subprocess.run(
            [*RELAYCTL, "start", "--listen", f"127.0.0.1:{port}", "--workers", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"held by running process {os.getpid()}" in lines[0]
        assert "Traceback" not in result.stderr
    finally:
        held.close()
        held.unlink()
