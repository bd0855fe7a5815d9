"""Relay metrics: the pure families from a stats reply, and `relayctl start --metrics` served
by a real launcher (from shared memory) with its liveness and readiness probes."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.relay.test_supervision import _squat_internal_port
from tests.support.procs import RelayProcess, free_ports, wait_for
from voicerelay import metrics
from voicerelay.relay.router import COUNTER_FIELDS


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def render_stats(stats: dict, now: float) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.FunctionCollector(lambda: metrics.relay_families(stats, now)))
    return metrics.render(registry).decode()


counter_values = st.fixed_dictionaries({f: st.integers(0, 2**64 - 1) for f in COUNTER_FIELDS})


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(counter_values, st.integers(0, 10**6)), min_size=1, max_size=4),
    st.one_of(st.none(), st.floats(0, 2e9)),
    st.integers(0, 10**6),
)
def test_every_counter_of_every_worker_is_exposed_under_its_name(rows, last_ok, failures):
    now = 2e9
    stats = {
        "uptime": 12.5,
        "workers": [
            {"index": i, "counters": c, "restarts": r, "state": "running"}
            for i, (c, r) in enumerate(rows)
        ],
        "snapshot": {"last_ok": last_ok, "failures": failures},
    }
    got = samples(render_stats(stats, now))
    for i, (counters, restarts) in enumerate(rows):
        w = ("worker", str(i))
        for direction in ("in", "out"):
            d = ("direction", direction)
            assert got["voicerelay_relay_packets_total", (d, w)] == float(
                counters[f"packets_{direction}"]
            )
            assert got["voicerelay_relay_bytes_total", (d, w)] == float(
                counters[f"bytes_{direction}"]
            )
        for field in COUNTER_FIELDS:
            if field.startswith("drop_"):
                key = ("voicerelay_relay_drops_total", (("reason", field[5:]), w))
                assert got[key] == float(counters[field])
        assert got["voicerelay_relay_flows", (w,)] == float(counters["flows"])
        assert got["voicerelay_relay_worker_restarts_total", (w,)] == restarts
        for direction in ("in", "out"):
            key = ("voicerelay_relay_kernel_packets_total", (("direction", direction), w))
            assert got[key] == float(counters[f"kernel_packets_{direction}"])
        assert got["voicerelay_relay_kernel_flows", (w,)] == float(counters["kernel_flows"])
    for field in COUNTER_FIELDS:
        if field.startswith("hops_"):
            key = ("voicerelay_relay_hops_total", (("direction", field[5:]),))
            assert got[key] == float(sum(c[field] for c, _ in rows))
    assert got["voicerelay_relay_snapshot_failures_total", ()] == failures
    expected_age = 12.5 if last_ok is None else now - last_ok
    assert got["voicerelay_relay_snapshot_age_seconds", ()] == pytest.approx(expected_age)


@given(st.lists(st.sampled_from(["running", "backoff", "stopped"]), max_size=5))
def test_ready_only_when_every_worker_runs(states):
    ready = metrics.relay_ready({"workers": [{"state": s} for s in states]})
    assert ready == (bool(states) and all(s == "running" for s in states))


# A real relay ------------------------------------------------------------------------------
def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    port = free_ports(1, socket.SOCK_STREAM)
    extra = ["--metrics", f"127.0.0.1:{port}"]
    with RelayProcess(tmp_path_factory.mktemp("relay"), workers=2, extra=extra) as proc:
        proc.metrics_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield proc


def test_probes_and_metrics_come_from_the_launcher(relay):
    url = relay.metrics_url
    assert get(url + "/healthz")[0] == 200
    wait_for(lambda: get(url + "/readyz")[0] == 200, 10, 0.05, "readyz 200")
    status, text = get(url + "/metrics")
    assert status == 200
    got = samples(text)
    for worker in ("0", "1"):
        assert ("voicerelay_relay_flows", (("worker", worker),)) in got
        assert ("voicerelay_relay_worker_restarts_total", (("worker", worker),)) in got
    assert ("voicerelay_relay_snapshot_age_seconds", ()) in got
    # Served by the launcher itself, not a worker: the listening socket is the launcher's.
    port = int(url.rpartition(":")[2])
    owners = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert owners == {relay.launcher_pid()}


def test_junk_is_counted_as_a_drop_by_reason(relay):
    url = relay.metrics_url

    def unknown_protocol_drops() -> float:
        got = samples(get(url + "/metrics")[1])
        return sum(
            v
            for (name, labels), v in got.items()
            if name == "voicerelay_relay_drops_total" and ("reason", "unknown_protocol") in labels
        )

    before = unknown_protocol_drops()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(5):
            sock.sendto(b"\xff junk", relay.public)
    wait_for(lambda: unknown_protocol_drops() >= before + 5, 10, 0.05, "drops to be exposed")


def test_a_worker_that_cannot_start_makes_readyz_503_and_counts_its_restarts(relay):
    url = relay.metrics_url
    wait_for(lambda: get(url + "/readyz")[0] == 200, 10, 0.05, "readyz 200")
    key = ("voicerelay_relay_worker_restarts_total", (("worker", "0"),))
    before = samples(get(url + "/metrics")[1])[key]
    squatter = _squat_internal_port(relay, 0)  # killed, and its port taken: it cannot return
    try:
        wait_for(lambda: get(url + "/readyz")[0] == 503, 5, 0.02, "readyz 503")
        assert "worker" in get(url + "/readyz")[1]
        assert get(url + "/healthz")[0] == 200  # alive, just not ready
    finally:
        squatter.close()
    wait_for(lambda: get(url + "/readyz")[0] == 200, 15, 0.05, "readyz 200 again")
    assert samples(get(url + "/metrics")[1])[key] >= before + 1


def test_a_taken_metrics_port_fails_the_start_in_one_line_and_leaves_nothing(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        relay = RelayProcess(tmp_path, workers=1, extra=["--metrics", f"127.0.0.1:{port}"])
        try:
            result = relay.ctl(
                "start",
                "--internal",
                f"127.0.0.1:{relay.internal_base}",
                "--workers",
                "1",
                "--metrics",
                f"127.0.0.1:{port}",
                check=False,
            )
            assert result.returncode == 2
            assert result.stderr.count("\n") == 1 and "--metrics" in result.stderr
            assert not any(os.path.exists(f"/dev/shm/{n}") for n in relay.shm_names)
            assert not (tmp_path / f"relay-{relay.port}.pid").exists()
        finally:
            relay.cleanup()
