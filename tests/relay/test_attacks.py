"""Attacks on the relay's data path, on real sockets against a real relay (`relayctl start`):
flows without limit, tokens that never expire, a full table, keepalive junk, rebinding a call
with one spoofed check, junk that costs searches of every shard. Each is refused and counted
while honest clients keep working."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.fastpath import MODES, assert_mode, relay_args, require_mode
from tests.support.procs import RELAYCTL, RelayProcess, wait_for
from tests.support.standin import StandIn
from tests.wire.test_token import old_format_token
from voicerelay.relay.router import ADOPT_WINDOW
from voicerelay.wire import stun
from voicerelay.wire.token import load_keys

TOKEN_CLIENTS = 3
BURST = 6
REBIND_AFTER = 2.0
UNANSWERED = 1.0
ADMISSION = [
    "--token-clients",
    str(TOKEN_CLIENTS),
    "--new-flow-rate",
    "1",
    "--new-flow-burst",
    str(BURST),
    "--rebind-after",
    str(REBIND_AFTER),
    "--unanswered-timeout",
    str(UNANSWERED),
]


@pytest.fixture(scope="module", params=MODES)
def relay(tmp_path_factory, request):
    require_mode(request.param)
    extra = [*ADMISSION, *relay_args(request.param)]
    with RelayProcess(tmp_path_factory.mktemp("attacks"), workers=2, extra=extra) as proc:
        assert_mode(proc, request.param)
        yield proc


@pytest.fixture(scope="module")
def keys(relay):
    return load_keys(relay.secret_file)


@pytest.fixture
def transceiver() -> Iterator[StandIn]:
    standin = StandIn(echo=True).start()
    yield standin
    standin.close()


def check(ufrag: str, client_ufrag: str = "c") -> bytes:
    """A Binding request routed by `ufrag` (the relay reads only USERNAME's first half)."""
    return stun.build(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [(stun.ATTR_USERNAME, f"{ufrag}:{client_ufrag}".encode())],
        integrity_key=b"the relay cannot check this",
    )


@contextlib.contextmanager
def sockets(hosts: list[str], reuse_port: bool = False) -> Iterator[list[socket.socket]]:
    """One UDP socket on each loopback host (127/8 is all ours: any prefix, no spoofing)."""
    socks = []
    try:
        for host in hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, 0))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def totals(relay: RelayProcess) -> dict[str, int]:
    return relay.stats()["totals"]


def quiet_totals(relay: RelayProcess) -> dict[str, int]:
    """The relay's totals once two reads a publication period (100 ms) apart agree: nothing
    from an earlier step is still on its way to shared memory."""
    last = [totals(relay)]

    def steady() -> dict[str, int] | None:
        now = totals(relay)
        if now == last[0]:
            return now
        last[0] = now
        return None

    return wait_for(steady, 5, interval=0.15, what="counters at rest")


def grown(relay: RelayProcess, before: dict[str, int], **at_least: int) -> dict | None:
    """The relay's totals once every named counter grew by at least that much, else None."""
    now = totals(relay)
    return now if all(now[k] - before[k] >= n for k, n in at_least.items()) else None


def settled(relay: RelayProcess, before: dict[str, int], total: int, *names: str) -> dict | None:
    """The relay's totals once the named counters grew by `total` between them, else None."""
    now = totals(relay)
    return now if sum(now[n] - before[n] for n in names) == total else None


def delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after[name] - before[name]


def round_trip(sock: socket.socket, relay: RelayProcess, payload: bytes) -> bool:
    """Send media through the relay; True when the stand-in's echo comes back."""
    sock.settimeout(0.2)
    for _ in range(10):
        sock.sendto(payload, relay.public)
        with contextlib.suppress(TimeoutError):
            while True:
                data, _ = sock.recvfrom(2048)
                if data == b"E" + payload:
                    return True
    return False


def test_one_token_opens_flows_for_a_few_client_addresses_only(relay, keys, transceiver):
    """The issue's attack: one token, sources without end (each in its own /24, so the prefix
    limit does not apply). Before: a flow each. Now: `--token-clients` per worker."""
    token = keys.seal(0, transceiver.addr)
    before = quiet_totals(relay)
    with sockets([f"127.1.{i}.1" for i in range(40)]) as attackers:
        for sock in attackers:
            sock.sendto(check(token), relay.public)
        after = wait_for(
            lambda: settled(relay, before, 40, "flows_created", "drop_token_clients"),
            5,
            what="every source created or refused",
        )
        created = delta(after, before, "flows_created")
        assert created <= TOKEN_CLIENTS * relay.workers
        assert created + delta(after, before, "drop_token_clients") == 40
        reached = {s.getsockname() for s in attackers} & set(transceiver.received)
        assert len(reached) == created


def test_tokens_expire_and_tokens_without_a_time_open_nothing(relay, keys, transceiver):
    hour_old = keys.seal(0, transceiver.addr, time.time() - 3600)
    with open(relay.secret_file) as f:
        kid, hexkey = f.readline().split()
    old_format = old_format_token(bytes.fromhex(hexkey), int(kid), 0, transceiver.addr)
    before = quiet_totals(relay)
    with sockets(["127.4.0.1", "127.4.1.1", "127.4.2.1"]) as (late, old, honest):
        late.sendto(check(hour_old), relay.public)
        old.sendto(check(old_format), relay.public)
        honest.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
        wait_for(
            lambda: grown(relay, before, drop_token_expired=1, drop_token_old_format=1),
            5,
            what="both refusals counted",
        )
        assert round_trip(honest, relay, b"\x80honest")
        assert transceiver.got(late.getsockname()) == []
        assert transceiver.got(old.getsockname()) == []


def test_new_flows_from_one_prefix_are_rate_limited(relay, keys, transceiver):
    """A flood of first checks from one /24, every one with its own fresh token (so no token
    cap applies): at most the burst (and 1/s more) per worker; another prefix is untouched."""
    before = quiet_totals(relay)
    with sockets([f"127.5.0.{i}" for i in range(1, 61)]) as flood:
        for sock in flood:
            sock.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
        after = wait_for(
            lambda: settled(relay, before, 60, "flows_created", "drop_rate_limited"),
            5,
            what="the flood created or refused",
        )
        assert delta(after, before, "drop_rate_limited") > 0
        assert delta(after, before, "flows_created") <= (BURST + 2) * relay.workers
        with sockets(["127.5.1.1"]) as (neighbour,):
            neighbour.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
            assert round_trip(neighbour, relay, b"\x80neighbour")


def test_a_full_table_lets_honest_calls_in_and_junk_keeps_nothing_alive(tmp_path, transceiver):
    """Attackers fill every slot with flows nobody answers and keep them busy with junk, as in
    the issue (a byte every so often). An honest call still gets in (an unanswered flow gives
    way), and the attackers' flows go after `--unanswered-timeout` however busy they are."""
    extra = ["--capacity", "16", "--new-flow-rate", "0", "--unanswered-timeout", "1.5"]
    with (
        RelayProcess(tmp_path, workers=1, extra=extra) as relay,
        sockets([f"127.6.{i}.1" for i in range(16)]) as squatters,
        sockets(["127.6.100.1"]) as (honest,),
    ):
        keys = load_keys(relay.secret_file)
        for sock in squatters:
            sock.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
        wait_for(lambda: relay.stats()["table_flows"] == 16, 5, what="the table full")
        before = quiet_totals(relay)
        honest.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
        assert round_trip(honest, relay, b"\x80call")  # the echo is its return traffic
        after = wait_for(lambda: grown(relay, before, flows_evicted=1), 5, what="an eviction")
        assert delta(after, before, "flows_evicted") == 1
        assert delta(after, before, "drop_table_full") == 0

        def squatters_gone() -> bool:
            for sock in squatters:
                sock.sendto(b"\x01", relay.public)  # keepalive junk, all along
            return relay.stats()["table_flows"] == 1

        wait_for(squatters_gone, 6, interval=0.1, what="unanswered flows expired despite junk")
        assert round_trip(honest, relay, b"\x80still")


def test_a_spoofed_check_does_not_rebind_an_established_call(relay, keys):
    """The victim's call to A carries return traffic; an attacker sends one Binding request
    from the victim's address with a token for B (here: a second socket on the same address).
    Before: the call moved to B (an audio gap, repeatable). Now: refused and counted."""
    a, b = StandIn(echo=True).start(), StandIn(echo=True).start()
    try:
        with sockets(["127.7.0.1"], reuse_port=True) as (victim,):
            victim.sendto(check(keys.seal(0, a.addr)), relay.public)
            assert round_trip(victim, relay, b"\x80before")
            before = quiet_totals(relay)
            for n in range(3):  # repeatable, as in the issue: three tries, each refused
                attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                attacker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                attacker.bind(victim.getsockname())
                attacker.sendto(check(keys.seal(0, b.addr)), relay.public)
                attacker.close()
                assert round_trip(victim, relay, b"\x80after-%d" % n)
            assert b.got(victim.getsockname()) == []  # not one packet of the call went to B
            assert a.got(victim.getsockname())[-1] == b"\x80after-2"
            wait_for(lambda: grown(relay, before, drop_rebind_refused=3), 5, what="refusals")
    finally:
        a.close()
        b.close()


def test_junk_from_spoofed_sources_searches_no_other_shard(relay, keys, transceiver):
    """Unknown-address junk in the RTP, DTLS and other first-byte ranges, from many sources:
    dropped and counted, and (once no worker has started for a while) without a search of the
    other workers' shards, which cost 6-17 us a datagram before."""
    wait_for(lambda: relay.status()["uptime"] > ADOPT_WINDOW + 1, ADOPT_WINDOW + 5, what="startup")
    with (
        sockets(["127.8.0.1"]) as (honest,),
        sockets([f"127.8.{i}.2" for i in range(1, 51)]) as junk,
    ):
        honest.sendto(check(keys.seal(0, transceiver.addr)), relay.public)
        assert round_trip(honest, relay, b"\x80ping")
        before = quiet_totals(relay)
        for sock in junk:
            for first in (0x80, 0x90, 0x17, 0x16, 0x42, 0xFF):
                for _ in range(5):
                    sock.sendto(bytes([first]) + os.urandom(100), relay.public)
        after = wait_for(
            lambda: grown(relay, before, drop_unknown_flow=50 * 4 * 5),
            5,
            what="the junk counted",
        )
        after = wait_for(
            lambda: grown(relay, before, drop_unknown_protocol=50 * 2 * 5), 5, what="the rest"
        )
        assert delta(after, before, "shard_searches") == 0
        assert delta(after, before, "flows_adopted") == 0
        assert round_trip(honest, relay, b"\x80pong")


def test_a_secret_file_that_is_not_text_is_one_line_naming_the_fix(tmp_path):
    secret = tmp_path / "cluster.key"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    result = subprocess.run(
        [*RELAYCTL, "start", "--listen", "127.0.0.1:1", "--secret-file", str(secret)],
        env={**os.environ, "VOICERELAY_STATE_DIR": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "not UTF-8" in lines[0] and "--secret-file" in lines[0]
