"""Poisoned snapshots (issue 11): flows an attacker writes into the snapshot file or the Redis
key must not come back. Real relay processes, a real redis-server, real UDP sockets standing
for the victims: the relay must refuse the snapshot in one line, start empty, and send nothing
towards a poisoned address.

Two attacks, each as one poisoned flow:
- forward: client = the attacker, transceiver = a victim; the attacker's datagrams to the
  public port would be forwarded to the victim from the relay's internal port;
- reflect: client = a victim, transceiver = the attacker; the attacker's envelopes to the
  internal port would be sent to the victim from the relay's public port (a reflector).

A single worker makes the check exact rather than timed: after the attack, an honest client
opens a flow through the same sockets, so once its packets went both ways every attack datagram
queued before them has been handled too, and the victims' sockets hold all they will ever get.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest

from tests.support.procs import RedisServer, RelayProcess, wait_for
from tests.support.standin import MediaClient, StandIn, binding_request
from voicerelay.relay.snapshot import SnapshotSeal, encode_flows
from voicerelay.shm.flowtable import FlowRecord
from voicerelay.wire import envelope
from voicerelay.wire.token import load_keys

Addr = tuple[str, int]


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def udp(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def pending(sock: socket.socket) -> list[bytes]:
    """What already waits in a socket's receive queue (never blocks)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


class Scene:
    """The attacker's and the victims' sockets on loopback addresses of their own."""

    def __init__(self) -> None:
        self.attacker_client = udp("127.0.0.1")
        self.victim_transceiver = udp("127.0.0.5")
        self.attacker_transceiver = udp("127.0.0.3")
        self.victim_client = udp("127.0.0.6")

    def poisoned_flows(self) -> list[list]:
        """The two poisoned flows, as snapshot version 1 wrote them."""
        fwd = (*self.attacker_client.getsockname(), *self.victim_transceiver.getsockname())
        ref = (*self.victim_client.getsockname(), *self.attacker_transceiver.getsockname())
        return [[*fwd, 0.0, 0, 0], [*ref, 0.0, 0, 0]]

    def attack(self, relay: RelayProcess) -> None:
        for i in range(10):
            self.attacker_client.sendto(b"\x80forward %d" % i, relay.public)
            self.attacker_transceiver.sendto(
                envelope.pack(self.victim_client.getsockname(), b"\x80reflect %d" % i),
                ("127.0.0.1", relay.internal_base),
            )

    def close(self) -> None:
        for sock in (
            self.attacker_client,
            self.victim_transceiver,
            self.attacker_transceiver,
            self.victim_client,
        ):
            sock.close()


def honest_round_trip(relay: RelayProcess) -> None:
    """A new honest flow, both ways, through the relay's one worker (the barrier)."""
    keys = load_keys(relay.secret_file)
    transceiver = StandIn().start()
    client = MediaClient(relay.public)
    try:
        client.send(binding_request(keys, transceiver.addr))
        wait_for(lambda: transceiver.got(client.addr), 5, what="the honest flow to open")
        client.sock.settimeout(5)
        transceiver.reply(client.addr, b"\x80honest reply")
        assert client.sock.recv(2048) == b"\x80honest reply"
    finally:
        client.close()
        transceiver.close()


def unsigned_v1(flows: list[list]) -> bytes:
    """What version 1 stored, and what anyone who can write the file or the key can forge."""
    return msgpack.packb(
        {"format": "voicerelay-flows", "v": 1, "wall": time.time(), "flows": flows}
    )


def sealed_with(key_line: str, context: bytes) -> Callable[[list[list]], bytes]:
    """A well-formed version-2 snapshot sealed with a secret the relay does not hold."""
    key_id, key = key_line.split()

    def seal(flows: list[list]) -> bytes:
        records = [FlowRecord((f[0], f[1]), (f[2], f[3]), 0.0) for f in flows]
        return SnapshotSeal({int(key_id): bytes.fromhex(key)}, int(key_id), context).seal(
            encode_flows(records, 0.0)
        )

    return seal


def relay_context(relay: RelayProcess) -> bytes:
    from voicerelay.relay.config import RelayConfig
    from voicerelay.relay.snapshot import relay_context as context

    return context(RelayConfig(listen_port=relay.port, state_dir=relay.state_dir, workers=1))


def _cluster_sealed(relay: RelayProcess, flows: list[list]) -> bytes:
    """Sealed with the cluster's own key: authentic, but naming transceivers outside
    --transceiver-networks (a relay configured for 127.0.0.1/32 only)."""
    line = relay.secret_file.read_text().split("\n")[0]
    return sealed_with(line, relay_context(relay))(flows)


POISONS: dict[str, tuple[Callable[[RelayProcess, list[list]], bytes], str]] = {
    "unsigned": (lambda relay, flows: unsigned_v1(flows), "not sealed"),
    "foreign-key": (
        lambda relay, flows: sealed_with("0 " + "ab" * 32, relay_context(relay))(flows),
        "does not verify",
    ),
    "outside-networks": (_cluster_sealed, "outside --transceiver-networks"),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_poisoned_snapshot_is_refused_and_nothing_reaches_the_victims(
    tmp_path, request, backend, poison
):
    extra = ["--transceiver-networks", "127.0.0.1/32"] if poison == "outside-networks" else []
    if backend == "redis":
        extra += ["--redis", request.getfixturevalue("redis_server").url]
    relay = RelayProcess(tmp_path, workers=1, extra=extra)
    scene = Scene()
    try:
        relay.start()  # creates the state: secret, snapshot store
        relay.stop()
        make, says = POISONS[poison]
        blob = make(relay, scene.poisoned_flows())
        if backend == "redis":
            key = f"voicerelay:0:relay:{relay.port}:flows"
            request.getfixturevalue("redis_server").client().set(key, blob)
        else:
            (tmp_path / f"relay-{relay.port}.snapshot").write_bytes(blob)
        log = tmp_path / f"relay-{relay.port}.log"
        log.write_text("")
        relay.start()

        scene.attack(relay)
        honest_round_trip(relay)
        assert pending(scene.victim_transceiver) == []
        assert pending(scene.victim_client) == []

        assert relay.status()["restored_flows"] == 0
        restore = relay.stats()["restore"]
        assert restore["restored"] == 0 and says in restore["refused"], restore
        refusals = [ln for ln in log.read_text().splitlines() if "refused" in ln]
        assert len(refusals) == 1 and says in refusals[0], refusals
        assert "Traceback" not in log.read_text()
        assert "restore: refused" in relay.ctl("stats").stdout  # a person sees it too
    finally:
        scene.close()
        relay.cleanup()


def test_the_relays_own_snapshot_still_restores(tmp_path):
    """The control: a snapshot the relay sealed itself comes back, and its flow forwards."""
    relay = RelayProcess(tmp_path, workers=1, extra=["--snapshot-interval", "0.1"]).start()
    transceiver = StandIn(echo=True).start()
    client = MediaClient(relay.public)
    try:
        client.send(binding_request(load_keys(relay.secret_file), transceiver.addr))
        wait_for(lambda: transceiver.got(client.addr), 5, what="the flow to open")
        wait_for(
            lambda: relay.stats()["snapshot"]["flows_in_last_snapshot"] == 1, 5, what="snapshot"
        )
        relay.stop()
        relay.start()
        assert relay.stats()["restore"] == {
            "restored": 1,
            "refused": None,
            "source": f"file {tmp_path / f'relay-{relay.port}.snapshot'}",
        }
        client.stream(0.02)  # no new STUN: only the restored flow can carry it
        wait_for(lambda: len(client.arrivals) >= 5, 5, what="echoes through the restored flow")
    finally:
        client.close()
        transceiver.close()
        relay.cleanup()
