"""The relay as a user runs it: `relayctl start` with 2 workers, real UDP, real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.procs import RELAYCTL, RelayProcess, alive, free_ports, wait_for
from tests.support.standin import MediaClient, StandIn, binding_request
from voicerelay.wire import stun
from voicerelay.wire.token import load_keys


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    with RelayProcess(tmp_path_factory.mktemp("relay"), workers=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def keys(relay):
    return load_keys(relay.secret_file)


def recv_all(sock: socket.socket, count: int, timeout: float = 5.0) -> list[tuple[bytes, tuple]]:
    got = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while len(got) < count and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            got.append(sock.recvfrom(4096))
    return got


def test_200_clients_reach_their_transceiver_and_get_their_replies(relay, keys):
    a, b = StandIn().start(), StandIn().start()
    clients = []
    try:
        for i in range(200):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            target = a if i % 2 == 0 else b
            clients.append((sock, target))
            sock.sendto(binding_request(keys, target.addr, f"c{i:03d}"), relay.public)
        for i, (sock, _) in enumerate(clients):
            for n in range(3):
                sock.sendto(b"\x80" + f"{i}:{n}".encode(), relay.public)

        def all_arrived() -> bool:
            return all(len(t.got(s.getsockname())) == 4 for s, t in clients)

        wait_for(all_arrived, 10, what="every client's 4 packets at its transceiver")
        for i, (sock, target) in enumerate(clients):
            addr = sock.getsockname()
            other = b if target is a else a
            got = target.got(addr)
            assert stun.binding_server_ufrag(got[0]) is not None  # the STUN came first
            assert got[1:] == [b"\x80" + f"{i}:{n}".encode() for n in range(3)]
            assert other.got(addr) == []  # zero crosstalk
            target.reply(addr, b"\x80reply-" + str(i).encode())
        for i, (sock, _) in enumerate(clients):
            replies = recv_all(sock, 1)
            assert replies == [(b"\x80reply-" + str(i).encode(), relay.public)]
        assert relay.stats()["table_flows"] >= 200
        # Counters reach shared memory on the workers' 100 ms tick, not per packet.
        wait_for(lambda: relay.stats()["totals"]["flows_created"] >= 200, 2, what="flow counters")
    finally:
        for sock, _ in clients:
            sock.close()
        a.close()
        b.close()


def test_return_path_needs_a_live_flow_to_that_transceiver(relay, keys):
    a, b = StandIn().start(), StandIn().start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        client.sendto(binding_request(keys, a.addr), relay.public)
        wait_for(lambda: a.got(client.getsockname()), 5, what="flow to A")
        worker = a.workers[client.getsockname()]
        before = relay.stats()["totals"]
        b.sock.sendto(_envelope(client.getsockname(), b"\x80spoof"), worker)  # wrong transceiver
        a.sock.sendto(_envelope(stranger.getsockname(), b"\x80spray"), worker)  # no flow
        wait_for(
            lambda: _drops(relay, before, "return_wrong_transceiver", "return_no_flow"),
            5,
            what="both return drops counted",
        )
        assert recv_all(client, 1, timeout=0.3) == []
        assert recv_all(stranger, 1, timeout=0.3) == []
    finally:
        client.close()
        stranger.close()
        a.close()
        b.close()


def _envelope(client, payload):
    from voicerelay.wire import envelope

    return envelope.pack(client, payload)


def _drops(relay, before, *reasons) -> bool:
    totals = relay.stats()["totals"]
    return all(totals[f"drop_{r}"] > before[f"drop_{r}"] for r in reasons)


garbage = st.one_of(
    st.binary(min_size=0, max_size=64),
    st.binary(min_size=1501, max_size=1600),  # oversize
    st.builds(lambda b: b"\x00\x01" + b, st.binary(max_size=40)),  # truncated STUN-ish
    st.builds(
        lambda tok: stun.build(
            stun.BINDING_REQUEST, b"x" * 12, [(stun.ATTR_USERNAME, tok + b":c")]
        ),
        st.text(alphabet="ABCDEFabcdef0123456789+/", min_size=4, max_size=80).map(str.encode),
    ),
)


@pytest.fixture(scope="module")
def honest(relay, keys):
    """An honest client with a live flow to an echoing transceiver, and a fuzzing socket."""
    transceiver = StandIn(echo=True).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    fuzzer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fuzzer.bind(("127.0.0.1", 0))
    client.sendto(binding_request(keys, transceiver.addr), relay.public)
    wait_for(lambda: transceiver.got(client.getsockname()), 5, what="honest flow")
    yield transceiver, client, fuzzer
    client.close()
    fuzzer.close()
    transceiver.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(datagrams=st.lists(garbage, min_size=1, max_size=8))
def test_forged_and_random_datagrams_are_dropped_while_honest_clients_work(
    relay, honest, datagrams
):
    transceiver, client, fuzzer = honest
    for data in datagrams:
        fuzzer.sendto(data, relay.public)
    client.sendto(b"\x80ping", relay.public)
    assert recv_all(client, 1) == [(b"E\x80ping", relay.public)]
    assert transceiver.got(fuzzer.getsockname()) == []


def test_fuzzing_was_counted_and_no_worker_died(relay):
    stats = relay.stats()
    drops = {k: v for k, v in stats["totals"].items() if k.startswith("drop_")}
    for reason in ("unknown_flow", "bad_token", "oversize"):
        assert drops[f"drop_{reason}"] > 0, drops
    assert all(w["restarts"] == 0 and w["alive"] for w in stats["workers"])


def test_worker_killed_mid_stream_comes_back_and_keeps_flows(tmp_path):
    with RelayProcess(tmp_path, workers=2) as relay:
        keys = load_keys(relay.secret_file)
        transceiver = StandIn(echo=True).start()
        client = MediaClient(relay.public)
        try:
            client.send(binding_request(keys, transceiver.addr))
            wait_for(lambda: transceiver.got(client.addr), 5, what="flow")
            client.stream(0.01)
            wait_for(lambda: len(client.arrivals) > 20, 5, what="echoes")
            status = relay.status()
            owner = next(
                w
                for w in status["workers"]
                if f"127.0.0.1:{transceiver.workers[client.addr][1]}" == w["internal"]
            )
            killed_at = time.monotonic()
            os.kill(owner["pid"], signal.SIGKILL)

            def replaced() -> bool:
                w = relay.status()["workers"][owner["index"]]
                return w["alive"] and w["pid"] != owner["pid"]

            wait_for(replaced, 1.0, what="the killed worker to be replaced within a second")
            assert relay.stats()["table_flows"] >= 1  # the flow survived in shared memory
            wait_for(
                lambda: any(t > killed_at + 0.05 for t in client.arrivals),
                3,
                what="echoes after the kill",
            )
            gap = client.max_gap(since=killed_at - 0.1)
            assert gap < 1.0, f"media gap {gap:.3f} s after a worker kill"
        finally:
            client.close()
            transceiver.close()


def test_stop_leaves_no_process_and_no_shared_memory(tmp_path):
    relay = RelayProcess(tmp_path, workers=2).start()
    pids = [relay.launcher_pid(), *relay.worker_pids()]
    assert all(os.path.exists(f"/dev/shm/{n}") for n in relay.shm_names)
    relay.stop()
    for pid in pids:
        wait_for(lambda p=pid: not alive(p), 5, what=f"pid {pid} gone")
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in relay.shm_names)
    assert not (tmp_path / f"relay-{relay.port}.sock").exists()
    assert not (tmp_path / f"relay-{relay.port}.pid").exists()


def test_second_start_on_the_same_port_is_refused(relay):
    result = relay.ctl("start", check=False)
    assert result.returncode != 0
    assert "relayctl stop" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["--listen", "nonsense"], "IP address"),
        (["--listen", "127.0.0.1:99999"], "1-65535"),
        (["--workers", "0"], "1-256"),
        (["--redis", "http://localhost"], "redis://"),
        (["--idle-timeout", "-1"], "idle timeout"),
        (["--workers", "many"], "not a valid integer"),
    ],
)
def test_bad_options_give_one_line_naming_the_fix(tmp_path, args, fix):
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)}
    result = subprocess.run(
        [*RELAYCTL, "start", *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert fix in result.stderr
    assert "Traceback" not in result.stderr
    assert (
        len(
            [
                ln
                for ln in result.stderr.splitlines()
                if ln.strip() and not ln.startswith(("Usage", "Try"))
            ]
        )
        == 1
    )


def test_port_taken_by_a_stranger_is_refused(tmp_path):
    port = free_ports(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        env = {**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path)}
        result = subprocess.run(
            [
                *RELAYCTL,
                "start",
                "--listen",
                f"127.0.0.1:{port}",
                "--internal",
                f"127.0.0.1:{free_ports(2)}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "--listen" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_relayctl_stats_and_status_print_what_a_person_reads(relay):
    import json

    human = relay.ctl("stats").stdout
    assert "pkts in" in human and "total" in human and "snapshot: file" in human
    parsed = json.loads(relay.ctl("stats", "--json").stdout)
    assert len(parsed["workers"]) == 2 and "drop_unknown_flow" in parsed["totals"]
    status = relay.ctl("status").stdout
    assert status.count("alive") == 2
