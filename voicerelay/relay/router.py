"""Every forwarding decision of a relay worker, as pure code (no sockets, no clock reads).

Peers are raw `struct sockaddr` bytes, as the worker's batched I/O (recvmmsg/sendmmsg) sees
them: `client_datagram` and `transceiver_datagram` are the hot path. `from_client` and
`from_transceiver` take and return `Addr` tuples instead, for callers that think in addresses.

Client -> transceiver: a known flow costs a dict lookup and one bytes concatenation of the
flow's cached envelope header with the datagram. The first packet of a flow must be a STUN
Binding request whose server ufrag is a routing token that opens; a non-STUN packet from an
unknown address is looked up in the other workers' shards (adopted on a hit) or dropped.

Transceiver -> client: only for a live flow binding that client to that transceiver, found by
the exact envelope header bytes (another dict lookup), else in the shared table.

Per-flow counters and last-seen stay in process and reach shared memory on `flush`, called on
a short timer: the hot path never writes shared memory.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from voicerelay.shm.flowtable import FlowTable, ShardWriter, TableFull
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import Addr, addr_from_sockaddr, canonical, sockaddr
from voicerelay.wire.token import TokenError, TokenKeys

MOVED_AFTER = 1.0  # s silent here, with a fresher copy in another shard: the client moved
MAX_DATAGRAM = 1500  # client datagrams above this are not WebRTC media: dropped as oversize
HEADER_SIZE = envelope.HEADER_SIZE
MAX_ENVELOPE = MAX_DATAGRAM + HEADER_SIZE

DROP_REASONS = (
    "malformed",
    "oversize",
    "unknown_flow",
    "bad_token",
    "foreign_cluster",
    "table_full",
    "transceiver_unreachable",
    "send_failed",
    "envelope_malformed",
    "envelope_version",
    "return_no_flow",
    "return_wrong_transceiver",
)
COUNTER_FIELDS: tuple[str, ...] = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "flows",
    "flows_created",
    "flows_adopted",
    "flows_expired",
    "flows_rebound",
    *(f"drop_{reason}" for reason in DROP_REASONS),
)


class LocalFlow:
    """A flow as this worker sees it: where it goes, its cached header, unflushed activity."""

    __slots__ = (
        "client",
        "transceiver",
        "peer",
        "transceiver_peer",
        "header",
        "ufrag",
        "slot",
        "packets_in",
        "packets_out",
    )

    def __init__(
        self,
        client: Addr,
        transceiver: Addr,
        peer: bytes,
        transceiver_peer: bytes,
        slot: int,
        ufrag: bytes = b"",
        packets_in: int = 0,
        packets_out: int = 0,
    ) -> None:
        self.client = client
        self.transceiver = transceiver
        self.peer = peer  # the client's sockaddr on the public socket
        self.transceiver_peer = transceiver_peer  # the transceiver's, on the internal socket
        self.header = envelope.pack_header(client)
        self.ufrag = ufrag
        self.slot = slot
        self.packets_in = packets_in
        self.packets_out = packets_out


class RelayRouter:
    """The forwarding state of one worker: its flows, its shard, its counters."""

    def __init__(
        self,
        keys: TokenKeys,
        table: FlowTable,
        shard: int,
        *,
        cluster_id: int = 0,
        idle_timeout: float = 30.0,
        cluster_routes: dict[int, Addr] | None = None,
        expire_interval: float = 0.1,
        public_family: int = socket.AF_INET,
        internal_family: int = socket.AF_INET,
    ) -> None:
        self.keys = keys
        self.public_family = public_family
        self.internal_family = internal_family
        self.table = table
        self.shard_index = shard
        self.writer: ShardWriter = table.shard(shard)
        self.cluster_id = cluster_id
        self.cluster_routes = dict(cluster_routes or {})
        self.idle_timeout = idle_timeout
        # Sweep the whole shard within half the idle timeout, a slice per timer tick.
        ticks = max(1.0, idle_timeout / 2 / expire_interval)
        self.expire_budget = max(64, int(table.capacity / ticks) + 1)
        self.flows: dict[Addr, LocalFlow] = {}
        self.by_peer: dict[bytes, LocalFlow] = {}
        self.by_header: dict[bytes, LocalFlow] = {}
        self.dirty: set[LocalFlow] = set()
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.events = dict.fromkeys(
            ("flows_created", "flows_adopted", "flows_expired", "flows_rebound"), 0
        )
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        # Flows already in this shard (a restarted worker's) are adopted on their first packet,
        # so starting costs the same at any table size.

    # Client -> transceiver ------------------------------------------------------------------
    def client_datagram(self, data: bytes, peer: bytes, now: float) -> tuple[bytes, bytes] | None:
        """Where a client's datagram goes: (transceiver sockaddr, envelope), or None if dropped.

        `peer` is the client's sockaddr as the public socket reported it."""
        flow = self.by_peer.get(peer)
        n = len(data)
        if flow is not None and 0 < n <= MAX_DATAGRAM and data[0] > 3:
            flow.packets_in += 1
            self.dirty.add(flow)
            self.packets_in += 1
            self.bytes_in += n
            return flow.transceiver_peer, flow.header + data
        return self._client_slow(data, peer, flow, now)

    def from_client(self, data: bytes, client: Addr, now: float) -> tuple[Addr, bytes] | None:
        """`client_datagram` in addresses: (transceiver, envelope), or None if dropped."""
        try:
            peer = sockaddr(client, self.public_family)
        except ValueError:
            return self._drop("malformed")
        routed = self.client_datagram(data, peer, now)
        return None if routed is None else (addr_from_sockaddr(routed[0]), routed[1])

    def _client_slow(
        self, data: bytes, peer: bytes, flow: LocalFlow | None, now: float
    ) -> tuple[bytes, bytes] | None:
        if not data:
            return self._drop("malformed")
        if len(data) > MAX_DATAGRAM:
            return self._drop("oversize")
        try:
            client = addr_from_sockaddr(peer)
        except ValueError:
            return self._drop("malformed")
        if data[0] <= 3:
            ufrag = stun.binding_server_ufrag(data)
            if ufrag is not None and (flow is None or ufrag != flow.ufrag):
                flow = self._route_by_token(ufrag, client, flow, now)
                if flow is None:
                    return None
        if flow is None:
            flow = self._adopt(client, now)
            if flow is None:
                return self._drop("unknown_flow")
        flow.packets_in += 1
        self.dirty.add(flow)
        self.packets_in += 1
        self.bytes_in += len(data)
        return flow.transceiver_peer, flow.header + data

    def _route_by_token(
        self, ufrag: bytes, client: Addr, flow: LocalFlow | None, now: float
    ) -> LocalFlow | None:
        try:
            route = self.keys.open(ufrag)
        except TokenError:
            self._drop("bad_token")
            return None
        if route.cluster_id == self.cluster_id:
            transceiver = canonical(route.transceiver)
        elif route.cluster_id in self.cluster_routes:
            transceiver = self.cluster_routes[route.cluster_id]
        else:
            self._drop("foreign_cluster")
            return None
        if flow is not None and flow.transceiver == transceiver:
            flow.ufrag = ufrag
            return flow
        if not self._reachable(transceiver):
            self._drop("transceiver_unreachable")
            return None
        try:
            slot = self.writer.put(client, transceiver, now)
        except TableFull:
            self._drop("table_full")
            return None
        if flow is not None:
            self.events["flows_rebound"] += 1
            self._forget(flow)
        else:
            self.events["flows_created"] += 1
        return self._remember(client, transceiver, ufrag, slot)

    def _adopt(self, client: Addr, now: float) -> LocalFlow | None:
        """A flow another worker created (or a restarted worker's predecessor): take it over."""
        found = self.writer.get(client)
        if found is not None:
            slot, record = found
            return self._remember(client, record.transceiver, b"", slot)
        hit = self.table.lookup(client, skip=self.shard_index)
        if hit is None:
            return None
        _, record = hit
        if not self._reachable(record.transceiver):
            return None
        try:
            slot = self.writer.put(client, record.transceiver, now)
        except TableFull:
            return None
        self.events["flows_adopted"] += 1
        return self._remember(client, record.transceiver, b"", slot)

    def _reachable(self, transceiver: Addr) -> bool:
        try:
            sockaddr(transceiver, self.internal_family)
        except ValueError:
            return False
        return True

    def _remember(self, client: Addr, transceiver: Addr, ufrag: bytes, slot: int) -> LocalFlow:
        flow = LocalFlow(
            client,
            transceiver,
            sockaddr(client, self.public_family),
            sockaddr(transceiver, self.internal_family),
            slot,
            ufrag,
        )
        self.flows[client] = flow
        self.by_peer[flow.peer] = flow
        self.by_header[flow.header] = flow
        return flow

    def _forget(self, flow: LocalFlow) -> None:
        self.flows.pop(flow.client, None)
        self.by_peer.pop(flow.peer, None)
        self.by_header.pop(flow.header, None)
        self.dirty.discard(flow)

    # Transceiver -> client ------------------------------------------------------------------
    def transceiver_datagram(
        self, data: bytes, peer: bytes, now: float
    ) -> tuple[bytes, bytes] | None:
        """Where a transceiver's envelope goes: (client sockaddr, datagram), or None if dropped.

        `peer` is the transceiver's sockaddr as the internal socket reported it."""
        flow = self.by_header.get(data[:HEADER_SIZE])
        if flow is not None and flow.transceiver_peer == peer and len(data) <= MAX_ENVELOPE:
            flow.packets_out += 1
            self.dirty.add(flow)
            self.packets_out += 1
            self.bytes_out += len(data) - HEADER_SIZE
            return flow.peer, data[HEADER_SIZE:]
        return self._transceiver_slow(data, peer, flow)

    def from_transceiver(self, data: bytes, source: Addr, now: float) -> tuple[Addr, bytes] | None:
        """`transceiver_datagram` in addresses: (client, datagram), or None if dropped."""
        try:
            peer = sockaddr(source, self.internal_family)
        except ValueError:
            return self._drop("envelope_malformed")
        routed = self.transceiver_datagram(data, peer, now)
        return None if routed is None else (addr_from_sockaddr(routed[0]), routed[1])

    def _transceiver_slow(
        self, data: bytes, peer: bytes, flow: LocalFlow | None
    ) -> tuple[bytes, bytes] | None:
        if len(data) > MAX_ENVELOPE:
            return self._drop("oversize")
        if flow is not None:
            return self._drop("return_wrong_transceiver")
        try:
            client = envelope.unpack_header(data)
        except envelope.EnvelopeError as exc:
            return self._drop(
                "envelope_version" if exc.reason == "version" else "envelope_malformed"
            )
        hit = self.table.lookup(client)
        if hit is None:
            return self._drop("return_no_flow")
        try:
            bound = sockaddr(hit[1].transceiver, self.internal_family)
            client_peer = sockaddr(client, self.public_family)
        except ValueError:
            return self._drop("return_wrong_transceiver")
        if bound != peer:
            return self._drop("return_wrong_transceiver")
        self.packets_out += 1
        self.bytes_out += len(data) - HEADER_SIZE
        return client_peer, data[HEADER_SIZE:]

    # Timers ---------------------------------------------------------------------------------
    def flush(self, now: float) -> int:
        """Write activity of flows that moved since the last flush to shared memory."""
        touch = self.writer.touch
        count = len(self.dirty)
        for flow in self.dirty:
            touch(flow.slot, now, flow.packets_in, flow.packets_out)
        self.dirty.clear()
        return count

    def expire(self, now: float) -> list[Addr]:
        """Drop flows idle past the timeout, or silent here while a fresher copy lives in
        another shard (adopted by another worker), a slice of the shard per call."""
        removed = self.writer.expire(
            now, self.idle_timeout, self.expire_budget, moved_after=MOVED_AFTER
        )
        for client in removed:
            flow = self.flows.get(client)
            if flow is not None:
                self._forget(flow)
        self.events["flows_expired"] += len(removed)
        return removed

    def remove(self, clients: Iterable[Addr]) -> None:
        for client in clients:
            flow = self.flows.get(client)
            if flow is not None:
                self._forget(flow)
            self.writer.remove(client)

    # Counters -------------------------------------------------------------------------------
    def _drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count
        return None

    def count_send_failures(self, count: int) -> None:
        """Datagrams the kernel did not take (a full socket buffer): counted as drops."""
        self._drop("send_failed", count)

    def counters(self) -> dict[str, int]:
        """Every counter of `COUNTER_FIELDS`, as published to shared memory."""
        values = {
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "flows": len(self.flows),
            **self.events,
        }
        values.update((f"drop_{reason}", count) for reason, count in self.drops.items())
        return values
