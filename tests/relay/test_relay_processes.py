"""The relay as a user runs it: `relayctl start` with 2 workers, real UDP, real processes; the
forwarding tests run both ways, in userspace and with the kernel fast path."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import time

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fastpath import MODES, assert_mode, relay_args, require_mode
from tests.support.procs import RELAYCTL, RelayProcess, alive, free_ports, wait_for
from tests.support.standin import MediaClient, StandIn, binding_request
from voicerelay.wire import envelope, stun
from voicerelay.wire.token import TokenKeys, load_keys


@pytest.fixture(scope="module", params=MODES)
def mode(request):
    require_mode(request.param)
    return request.param


@pytest.fixture(scope="module")
def relay(tmp_path_factory, mode):
    with RelayProcess(tmp_path_factory.mktemp("relay"), workers=2, extra=relay_args(mode)) as proc:
        assert_mode(proc, mode)
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


def pending(sock: socket.socket) -> list[bytes]:
    """Whatever already waits in a socket's receive queue (does not block)."""
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


def _grown(relay: RelayProcess, before: dict, counter: str, by: int) -> dict | None:
    stats = relay.stats()
    return stats if stats["totals"][counter] - before["totals"][counter] >= by else None


def test_200_clients_reach_their_transceiver_and_get_their_replies(relay, keys):
    a, b = StandIn().start(), StandIn().start()
    clients = []
    before = relay.stats()
    try:
        for i in range(200):
            sock = relay.client_socket()
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
            addr = sock.getsockname()  # the client's true address: the envelope must carry it
            other = b if target is a else a
            got = target.got(addr)
            assert stun.binding_server_ufrag(got[0]) is not None  # the STUN came first
            assert got[1:] == [b"\x80" + f"{i}:{n}".encode() for n in range(3)]
            assert other.got(addr) == []  # zero crosstalk
            target.reply(addr, b"\x80reply-" + str(i).encode())
        # Nothing reached a transceiver under an address that is not one of the clients'.
        assert set(a.received) | set(b.received) == {s.getsockname() for s, _ in clients}
        for i, (sock, _) in enumerate(clients):
            replies = recv_all(sock, 1)
            assert replies == [(b"\x80reply-" + str(i).encode(), relay.public)]
        for sock, _ in clients:  # every reply has been forwarded: none went to a second client
            assert pending(sock) == []
        # Counters reach shared memory on the workers' 100 ms tick, not per packet.
        after = wait_for(lambda: _grown(relay, before, "flows_created", 200), 2, what="counters")
        assert after["table_flows"] >= 200
        # Both workers carried a share (the kernel's SO_REUSEPORT hash spreads the clients).
        created = [
            w["counters"]["flows_created"] - v["counters"]["flows_created"]
            for w, v in zip(after["workers"], before["workers"], strict=True)
        ]
        assert len(created) == 2 and all(n > 0 for n in created), created
    finally:
        for sock, _ in clients:
            sock.close()
        a.close()
        b.close()


def test_return_path_needs_a_live_flow_to_that_transceiver(relay, keys):
    a, b = StandIn().start(), StandIn().start()
    client = relay.client_socket()
    stranger = relay.client_socket()
    try:
        client.sendto(binding_request(keys, a.addr), relay.public)
        wait_for(lambda: a.got(client.getsockname()), 5, what="flow to A")
        worker = a.workers[client.getsockname()]
        before = relay.stats()["totals"]
        b.sock.sendto(envelope.pack(client.getsockname(), b"\x80spoof"), worker)  # wrong one
        a.sock.sendto(envelope.pack(stranger.getsockname(), b"\x80spray"), worker)  # no flow
        wait_for(
            lambda: _drops(relay, before, "return_wrong_transceiver", "return_no_flow"),
            5,
            what="both return drops counted",
        )
        assert recv_all(client, 1, timeout=0.3) == []
        assert recv_all(stranger, 1, timeout=0.3) == []
        a.reply(client.getsockname(), b"\x80legit")  # the flow's own transceiver gets through
        assert recv_all(client, 1) == [(b"\x80legit", relay.public)]
    finally:
        client.close()
        stranger.close()
        a.close()
        b.close()


def _drops(relay, before, *reasons) -> bool:
    totals = relay.stats()["totals"]
    return all(totals[f"drop_{r}"] > before[f"drop_{r}"] for r in reasons)


# Fuzzing over real sockets ------------------------------------------------------------------

WRONG_KEY = TokenKeys({0: b"w" * 32}, 0)  # the relay's key id with another key: a forgery
ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def _stun_with_ufrag(ufrag: bytes) -> bytes:
    return stun.build(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [(stun.ATTR_USERNAME, ufrag + b":c")],
        integrity_key=b"k",
    )


def _versioned(client: tuple[str, int], version: int, payload: bytes) -> bytes:
    data = bytearray(envelope.pack(client, payload))
    data[2] = version
    return bytes(data)


def public_garbage(keys: TokenKeys, transceiver: tuple[str, int]) -> st.SearchStrategy[bytes]:
    """What anyone may throw at the public port; none of it may open a flow or get through."""
    genuine = st.builds(lambda: keys.seal(0, transceiver).encode())
    forged_tokens = st.one_of(
        st.text(alphabet=ICE_CHARS, min_size=4, max_size=80).map(str.encode),
        st.builds(lambda: WRONG_KEY.seal(0, transceiver).encode()),
        st.builds(_flip, genuine, st.integers(0, 8 * 51 - 1)),
    )
    return st.one_of(
        st.binary(min_size=0, max_size=64),  # random, the empty datagram included
        st.binary(min_size=1501, max_size=9000),  # oversize, some beyond a receive slot
        st.builds(lambda b: bytes([b[0] % 4]) + b[1:], st.binary(min_size=1, max_size=60)),
        st.builds(  # a genuine first packet, truncated
            lambda cut: binding_request(keys, transceiver)[:cut], st.integers(1, 90)
        ),
        st.builds(_stun_with_ufrag, forged_tokens),
        st.builds(  # DTLS- and RTP-looking datagrams from an address with no flow
            lambda first, rest: bytes([first]) + rest,
            st.sampled_from([22, 23, 128, 144, 200]),
            st.binary(max_size=200),
        ),
        st.builds(lambda p: envelope.pack(("127.0.0.1", 1), p), st.binary(max_size=50)),
    )


def internal_garbage(honest_client: tuple[str, int]) -> st.SearchStrategy[bytes]:
    """What a rogue host may send to a worker's internal port, to reach clients."""
    return st.one_of(
        st.binary(max_size=40),  # short, bad magic, version, family
        st.builds(lambda p: envelope.pack(honest_client, p), st.binary(max_size=100)),  # spoof
        st.builds(  # spray at clients that have no flow
            lambda port, p: envelope.pack(("127.0.0.1", port), p),
            st.integers(1, 65535),
            st.binary(max_size=100),
        ),
        st.builds(_versioned, st.just(honest_client), st.integers(2, 255), st.binary(max_size=20)),
        st.builds(
            lambda p: envelope.pack(honest_client, p), st.binary(min_size=1501, max_size=3000)
        ),
    )


def _drop_total(stats: dict) -> int:
    return sum(v for k, v in stats["totals"].items() if k.startswith("drop_"))


def test_forged_and_random_datagrams_are_counted_drops_and_honest_clients_work(relay, keys):
    transceiver = StandIn(echo=True).start()
    client = relay.client_socket()
    fuzzer = relay.client_socket()
    rogue = relay.client_socket()  # the transceiver of no flow
    internals = [("127.0.0.1", relay.internal_base + i) for i in range(relay.workers)]
    pings = iter(range(1_000_000))
    sent = 0
    try:
        # The check is retransmitted, as ICE does: the module's earlier tests may have spent
        # 127.0.0.0/24's new-flow budget for a moment.
        def check_in() -> bool:
            client.sendto(binding_request(keys, transceiver.addr), relay.public)
            return transceiver.got(client.getsockname())

        wait_for(check_in, 5, 0.2, what="honest flow")
        before = relay.stats()

        def honest_round_trip() -> None:
            ping = b"\x80ping-%d" % next(pings)
            client.sendto(ping, relay.public)
            assert recv_all(client, 1) == [(b"E" + ping, relay.public)]

        @settings(max_examples=150, deadline=None)
        @given(
            public=st.lists(public_garbage(keys, transceiver.addr), max_size=8),
            internal=st.lists(internal_garbage(client.getsockname()), max_size=4),
            worker=st.sampled_from(internals),
        )
        def fuzz(public: list[bytes], internal: list[bytes], worker: tuple[str, int]) -> None:
            nonlocal sent
            for data in public:
                fuzzer.sendto(data, relay.public)
            for data in internal:
                rogue.sendto(data, worker)
            sent += len(public) + len(internal)
            honest_round_trip()  # the honest session never notices...
            assert transceiver.got(fuzzer.getsockname()) == []  # ...and nothing got through

        fuzz()
        fuzzer.sendto(b"x" * 65000, relay.public)  # about the largest datagram UDP carries
        sent += 1
        # Every datagram was dropped and counted under some reason (published every 100 ms).
        wait_for(
            lambda: _drop_total(relay.stats()) - _drop_total(before) == sent,
            5,
            what=f"{sent} drops counted",
        )
        honest_round_trip()
        after = relay.stats()
        assert _drop_total(after) - _drop_total(before) == sent  # the honest one: not dropped
        grew = {
            k.removeprefix("drop_")
            for k, v in after["totals"].items()
            if k.startswith("drop_") and v > before["totals"][k]
        }
        for reason in ("malformed", "oversize", "unknown_flow", "bad_token", "envelope_malformed"):
            assert reason in grew, grew
        assert {"return_no_flow", "return_wrong_transceiver", "envelope_version"} <= grew, grew
        assert all(w["restarts"] == 0 and w["alive"] for w in after["workers"])
        assert pending(client) == []  # no spoofed envelope reached the honest client
    finally:
        for sock in (client, fuzzer, rogue):
            sock.close()
        transceiver.close()


def test_garbage_on_the_control_socket_does_not_hurt_the_launcher(relay):
    pid = relay.launcher_pid()

    @settings(max_examples=40, deadline=None)
    @given(
        st.binary(max_size=64) | st.builds(lambda b: struct.pack("!I", len(b) + 9) + b, st.binary())
    )
    def poke(data: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(relay.state_dir / f"relay-{relay.port}.sock"))
            sock.sendall(data)  # then hang up, mid-message or not
        assert relay.status()["pid"] == pid  # still answering, same process

    poke()
    assert all(w["alive"] and w["restarts"] == 0 for w in relay.status()["workers"])


# Crashes and stopping -----------------------------------------------------------------------


@pytest.mark.parametrize("how", MODES)
def test_worker_killed_mid_stream_comes_back_and_keeps_flows(tmp_path, how):
    require_mode(how)
    with RelayProcess(tmp_path, workers=2, extra=relay_args(how)) as relay:
        assert_mode(relay, how)
        keys = load_keys(relay.secret_file)
        transceiver = StandIn(echo=True).start()
        client = MediaClient(relay.public)
        idle = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
        try:
            for sock in idle:  # more flows, on both workers, that send nothing during the kill
                sock.bind(("127.0.0.1", 0))
                sock.sendto(binding_request(keys, transceiver.addr), relay.public)
            client.send(binding_request(keys, transceiver.addr))
            wait_for(lambda: transceiver.got(client.addr), 5, what="flow")
            client.stream(0.01)
            wait_for(lambda: len(client.arrivals) > 20, 5, what="echoes")
            flows = wait_for(
                lambda: (s := relay.stats())["table_flows"] == 41 and s, 5, what="41 flows"
            )
            owner = next(
                w
                for w in relay.status()["workers"]
                if f"127.0.0.1:{transceiver.workers[client.addr][1]}" == w["internal"]
            )
            shard_flows = flows["workers"][owner["index"]]["table_flows"]
            assert shard_flows >= 1
            killed_at = time.monotonic()
            os.kill(owner["pid"], signal.SIGKILL)

            def replaced() -> dict | None:
                w = relay.status()["workers"][owner["index"]]
                return w if w["alive"] and w["pid"] != owner["pid"] else None

            back = wait_for(replaced, 1.0, what="the killed worker to be replaced within a second")
            assert back["restarts"] == 1
            after = relay.stats()  # the flows live in the launcher's shared memory
            assert after["table_flows"] >= 41  # (+1 if the other worker adopted the client)
            assert after["workers"][owner["index"]]["table_flows"] >= shard_flows
            wait_for(
                lambda: sum(t > killed_at + 0.05 for t in client.arrivals) >= 10,
                3,
                what="echoes after the kill",
            )
            gap = client.max_gap(since=killed_at - 0.1)
            assert gap < 1.0, f"media gap {gap:.3f} s after a worker kill"
        finally:
            client.close()
            transceiver.close()
            for sock in idle:
                sock.close()


def test_stop_leaves_no_process_and_no_shared_memory(tmp_path):
    relay = RelayProcess(tmp_path, workers=2).start()
    try:
        launcher = psutil.Process(relay.launcher_pid())
        family = [launcher, *launcher.children(recursive=True)]
        assert {p.pid for p in family} >= {launcher.pid, *relay.worker_pids()}
        ours = [n for n in os.listdir("/dev/shm") if n.startswith(f"voicerelay-{relay.port}-")]
        assert sorted(ours) == sorted(relay.shm_names)
        result = relay.ctl("stop")
        assert "stopped" in result.stdout
        for proc in family:
            wait_for(lambda p=proc.pid: not alive(p), 5, what=f"pid {proc.pid} gone")
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"voicerelay-{relay.port}-")]
        assert not (tmp_path / f"relay-{relay.port}.sock").exists()
        assert not (tmp_path / f"relay-{relay.port}.pid").exists()
        assert relay.ctl("status", check=False).returncode != 0  # nobody answers any more
    finally:
        relay.cleanup()


def test_second_start_on_the_same_port_is_refused(relay):
    result = relay.ctl("start", check=False)
    assert result.returncode != 0
    assert "relayctl stop" in result.stderr
    assert "Traceback" not in result.stderr


# One-line errors --------------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single line a wrong option must produce (exit 2, nothing on stdout, no traceback)."""
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "fix"),
    [
        (["--listen", "nonsense"], {}, "--listen host 'nonsense' is not an IP address"),
        (["--listen", "127.0.0.1:99999"], {}, "--listen port 99999 is out of range: use 1-65535"),
        (["--internal", "nope"], {}, "write e.g. 127.0.0.1:4000"),
        (["--internal", "127.0.0.1:65535", "--workers", "2"], {}, "no room for 2 workers"),
        (["--workers", "0"], {}, "1-256"),
        (["--workers", "many"], {}, "'--workers': 'many' is not a valid integer"),
        (["--capacity", "3"], {}, "capacity 3 is out of range: use 16-"),
        (["--idle-timeout", "-1"], {}, "idle timeout -1.0 is out of range"),
        (["--redis", "http://localhost"], {}, "use redis://host:port/db"),
        ([], {"VOICERELAY_LISTEN": "1.2.3"}, "VOICERELAY_LISTEN"),
        ([], {"VOICERELAY_INTERNAL": "localhost"}, "VOICERELAY_INTERNAL"),
        ([], {"VOICERELAY_WORKERS": "0"}, "use 1-256 (value from VOICERELAY_WORKERS)"),
        ([], {"VOICERELAY_CAPACITY": "lots"}, "(value from VOICERELAY_CAPACITY)"),
        ([], {"VOICERELAY_IDLE_TIMEOUT": "0"}, "(value from VOICERELAY_IDLE_TIMEOUT)"),
    ],
)
def test_bad_options_give_one_line_naming_the_fix(tmp_path, args, env, fix):
    state = tmp_path / "state"
    result = subprocess.run(
        [*RELAYCTL, "start", *args],
        env={**os.environ, "VOICERELAY_STATE_DIR": str(state), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert fix in one_error_line(result)
    assert result.stdout == ""
    assert not (state / "relay-3478.pid").exists()  # nothing was started


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_missing_secret_file_is_an_error_not_a_new_key(tmp_path, how):
    """Only the default secret is created; a named one that is missing would split the cluster."""
    missing = tmp_path / "cluster" / "secret.key"
    port = free_ports(1)
    argv = [*RELAYCTL, "start", "--listen", f"127.0.0.1:{port}", "--internal", "127.0.0.1:1"]
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path / "state")}
    if how == "option":
        argv += ["--secret-file", str(missing)]
    else:
        env["VOICERELAY_SECRET_FILE"] = str(missing)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    line = one_error_line(result)
    assert f"secret file {missing} does not exist" in line and "--secret-file" in line
    if how == "env":
        assert "VOICERELAY_SECRET_FILE" in line
    assert not missing.exists() and not missing.parent.exists()  # nothing invented
    assert not (tmp_path / "state" / f"relay-{port}.pid").exists()


def test_a_restart_with_a_bad_option_leaves_the_running_relay_alone(relay, tmp_path):
    pid = relay.launcher_pid()
    result = relay.ctl("restart", "--secret-file", str(tmp_path / "missing.key"), check=False)
    assert "does not exist" in one_error_line(result)
    assert relay.status()["pid"] == pid  # still up, not stopped on the way to a failed start


def test_an_explicit_secret_file_is_used_as_given(tmp_path):
    """A relay started on a named secret opens the tokens sealed with that very secret."""
    from voicerelay.wire.token import write_new_secret

    shared = tmp_path / "cluster.key"
    keys = write_new_secret(shared)
    relay = RelayProcess(tmp_path / "state", workers=1, extra=["--secret-file", str(shared)])
    transceiver = StandIn().start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        relay.start()
        assert not relay.secret_file.exists()  # the default was not created beside it
        client.sendto(binding_request(keys, transceiver.addr), relay.public)
        wait_for(lambda: transceiver.got(client.getsockname()), 5, what="the token to open")
    finally:
        client.close()
        transceiver.close()
        relay.cleanup()


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


def test_relayctl_stats_and_status_print_what_a_person_reads(relay, mode):
    human = relay.ctl("stats").stdout
    assert "pkts in" in human and "total" in human and "snapshot: file" in human
    assert ("kernel fast path: " in human) == (mode == "kernel")
    parsed = json.loads(relay.ctl("stats", "--json").stdout)
    assert len(parsed["workers"]) == 2 and "drop_unknown_flow" in parsed["totals"]
    assert ("kernel" in parsed) == (mode == "kernel")
    status = relay.ctl("status").stdout
    assert status.count("alive") == 2
    assert ("kernel fast path on (lo)" in status) == (mode == "kernel")
