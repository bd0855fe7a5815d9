"""The kernel fast path in a running relay (`relayctl start --kernel-fast-path`, 2 workers, real
UDP on loopback): established flows go through the kernel, counters add up as without it, and
the kernel's flow map stays in agreement with the shared table through flow creation, rebinding,
expiry, a worker killed, and a full restart. When the fast path cannot run, the relay says so in
one line and forwards in userspace."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.fastpath import unavailable
from tests.support.procs import RelayProcess, wait_for
from tests.support.standin import StandIn, binding_request
from voicerelay.addresses import format_addr
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire.token import TokenKeys, load_keys

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
FAST = ["--kernel-fast-path"]


class Callers:
    """Client sockets that each open a flow to a transceiver and send numbered RTP-like packets
    in rounds, collecting the transceiver's echoes."""

    def __init__(self, relay: RelayProcess, keys: TokenKeys, count: int) -> None:
        self.relay, self.keys = relay, keys
        self.socks = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.sent = self.echoed = 0

    def addr(self, i: int) -> tuple[str, int]:
        return self.socks[i].getsockname()

    def open(self, transceiver: StandIn, which: range | None = None) -> None:
        """A Binding request with a token for `transceiver` from each caller, answered."""
        for i in which or range(len(self.socks)):
            self.socks[i].sendto(binding_request(self.keys, transceiver.addr), self.relay.public)
            wait_for(lambda i=i: self.addr(i) in transceiver.workers, 5, what="the request")
            transceiver.reply(self.addr(i), b"\x01\x01answer")
            self.sent += 1
        self.collect(lambda got: got.startswith(b"\x01\x01"), len(which or self.socks))

    def round(self, which: range | None = None, expect: bool = True) -> int:
        """One packet from each caller; the echoes that came back (all, within 3 s, if
        `expect`)."""
        chosen = which or range(len(self.socks))
        for i in chosen:
            self.socks[i].sendto(b"\x80" + self.sent.to_bytes(4, "big"), self.relay.public)
            self.sent += 1
        return self.collect(lambda got: got.startswith(b"E\x80"), len(chosen) if expect else 0)

    def collect(self, kind, count: int, timeout: float = 3.0) -> int:
        got, deadline = 0, time.monotonic() + (timeout if count else 0.2)
        while time.monotonic() < deadline and (got < count or not count):
            for sock in self.socks:
                try:
                    while True:
                        data = sock.recv(2048)
                        if kind(data):
                            got += 1
                            self.echoed += 1
                except BlockingIOError:
                    pass
            time.sleep(0.002)
        assert got >= count, f"{got} of {count} echoes came back"
        return got

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def table_flows(relay: RelayProcess) -> dict[str, list[tuple[str, int, int]]]:
    """Client -> [(transceiver, shard, packets out)] for every copy in the shared table."""
    table = FlowTable.attach(relay.shm_names[0])
    try:
        flows: dict[str, list[tuple[str, int, int]]] = {}
        for shard in range(table.shards):
            for r in table.records(shard):
                flows.setdefault(format_addr(r.client), []).append(
                    (format_addr(r.transceiver), shard, r.packets_out)
                )
        return flows
    finally:
        table.close()


def disagreement(relay: RelayProcess) -> str | None:
    """How the kernel's map and the shared table differ (None: they agree). Every flow that
    carried return traffic is in the map, to the transceiver the table names, sent from the
    internal port of a worker whose shard holds it; the map holds nothing else."""
    table = table_flows(relay)
    kernel = {f["client"]: f for f in relay.request("kernel_flows")["flows"]}
    answered = {c for c, copies in table.items() if any(out for *_, out in copies)}
    if set(kernel) != answered:
        return f"map only: {set(kernel) - answered}, answered table only: {answered - set(kernel)}"
    for client, entry in kernel.items():
        places = {(t, relay.internal_base + shard) for t, shard, _ in table[client]}
        if (entry["transceiver"], entry["internal_port"]) not in places:
            return f"{client}: map {entry}, table {table[client]}"
    return None


def agree(relay: RelayProcess, what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (diff := disagreement(relay)) is not None:
        assert time.monotonic() < deadline, f"{what}: kernel map and table differ: {diff}"
        time.sleep(0.05)


@pytest.fixture
def transceivers() -> Iterator[tuple[StandIn, StandIn]]:
    a, b = StandIn(echo=True).start(), StandIn(echo=True).start()
    yield a, b
    a.close()
    b.close()


def test_established_flows_go_through_the_kernel_and_every_counter_adds_up(tmp_path, transceivers):
    a, _ = transceivers
    with RelayProcess(tmp_path, workers=2, extra=FAST) as relay:
        callers = Callers(relay, load_keys(relay.secret_file), 20)
        try:
            callers.open(a)
            callers.round()  # answered: offloaded at the workers' next flush
            wait_for(lambda: relay.request("kernel_flows")["total"] == 20, 3, what="20 flows")
            agree(relay, "after creation")
            for _ in range(50):
                callers.round()
            stats = relay.stats()
            totals, kernel = stats["totals"], stats["kernel"]
            wait_for(
                lambda: (
                    (t := relay.stats()["totals"])["packets_in"] == callers.sent
                    and t["packets_out"] == callers.echoed
                ),
                3,
                what="the workers to take in the kernel's counts",
            )
            totals = relay.stats()["totals"]
            assert totals["kernel_packets_in"] >= 50 * 20  # the kernel carried the media
            assert totals["kernel_packets_out"] >= 50 * 20
            assert kernel["to_transceiver"] >= totals["kernel_packets_in"] - 20
            assert totals["kernel_flows"] == 20
            assert not any(v for k, v in totals.items() if k.startswith("drop_"))
            assert all(len(a.got(callers.addr(i))) == 52 for i in range(20))
            human = relay.ctl("stats").stdout
            assert "kernel fast path: 20 flows, forwarded" in human
        finally:
            callers.close()


def test_the_map_follows_the_table_through_rebinding_expiry_and_a_killed_worker(
    tmp_path, transceivers
):
    a, b = transceivers
    options = [*FAST, "--idle-timeout", "2", "--rebind-after", "1", "--unanswered-timeout", "2"]
    with RelayProcess(tmp_path, workers=2, extra=options) as relay:
        callers = Callers(relay, load_keys(relay.secret_file), 12)
        try:
            callers.open(a)
            callers.round()
            wait_for(lambda: relay.request("kernel_flows")["total"] == 12, 3, what="12 flows")
            agree(relay, "after creation")

            # Rebinding: caller 0's transceiver stops answering; past --rebind-after a new
            # token moves the flow to b, and the map follows once b answers.
            a.muted.add(callers.addr(0))
            callers.round(range(0, 1), expect=False)
            time.sleep(1.2)
            callers.open(b, range(0, 1))
            callers.round(range(0, 1))
            client0 = format_addr(callers.addr(0))

            def moved_to_b() -> bool:
                flows = relay.request("kernel_flows")["flows"]
                return any(
                    f["client"] == client0 and f["transceiver"] == format_addr(b.addr)
                    for f in flows
                )

            wait_for(moved_to_b, 3, what="the map to send caller 0 to b")
            agree(relay, "after the rebind")

            # Expiry: callers 1-3 get no more answers; past --idle-timeout they leave the table
            # and the map, while the others, answered by the kernel alone, stay.
            a.muted.update(callers.addr(i) for i in range(1, 4))
            deadline = time.monotonic() + 6
            while any(format_addr(callers.addr(i)) in table_flows(relay) for i in range(1, 4)):
                assert time.monotonic() < deadline, "silent flows did not expire"
                callers.round(range(4, 12))
                callers.round(range(0, 1))
                time.sleep(0.1)
            agree(relay, "after expiry")
            assert relay.request("kernel_flows")["total"] == 9

            # A worker killed: the kernel goes on forwarding its flows; its successor takes
            # them up (the workers' kernel_flows add up to the map again).
            victim = relay.status()["workers"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            callers.round(range(4, 12))  # answered while the worker is down
            wait_for(
                lambda: (w := relay.status()["workers"][0])["alive"] and w["pid"] != victim["pid"],
                3,
                what="the worker to be replaced",
            )
            callers.round(range(4, 12))
            wait_for(
                lambda: relay.stats()["totals"]["kernel_flows"] == 9, 3, what="9 offloaded flows"
            )
            agree(relay, "after a worker was killed")
        finally:
            callers.close()


def test_a_full_restart_brings_the_flows_back_to_the_kernel(tmp_path, transceivers):
    a, _ = transceivers
    with RelayProcess(tmp_path, workers=2, extra=FAST) as relay:
        callers = Callers(relay, load_keys(relay.secret_file), 8)
        try:
            callers.open(a)
            callers.round()
            agree(relay, "before the restart")
            time.sleep(1.2)  # a snapshot with the flows
            relay.ctl(
                "restart", "--internal", f"127.0.0.1:{relay.internal_base}", "--workers", "2", *FAST
            )
            callers.round()  # the restored flows carry media again, through the workers first
            wait_for(lambda: relay.request("kernel_flows")["total"] == 8, 3, what="8 flows")
            agree(relay, "after the restart")
            callers.round()
        finally:
            callers.close()


def test_without_clang_the_relay_says_why_in_one_line_and_forwards_in_userspace(
    tmp_path, transceivers
):
    a, _ = transceivers
    relay = RelayProcess(tmp_path, workers=1, extra=FAST)
    relay.env["PATH"] = str(tmp_path / "no-tools-here")
    with relay:
        started = relay.ctl("stop", check=False)  # (already started by the context)
        assert started.returncode == 0
        result = relay.ctl(
            "start", "--internal", f"127.0.0.1:{relay.internal_base}", "--workers", "1", *FAST
        )
        notes = [ln for ln in result.stdout.splitlines() if "kernel fast path" in ln]
        assert notes == [
            "  kernel fast path off: clang not found (apt install clang libbpf-dev); "
            "forwarding in userspace"
        ]
        callers = Callers(relay, load_keys(relay.secret_file), 2)
        try:
            callers.open(a)
            for _ in range(5):
                callers.round()
            assert relay.stats()["totals"]["kernel_packets_in"] == 0
        finally:
            callers.close()
