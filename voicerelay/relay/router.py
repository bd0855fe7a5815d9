"""Every forwarding decision of a relay worker, as pure code (no sockets, no clock reads).

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

from collections.abc import Iterable

from voicerelay.shm.flowtable import FlowTable, ShardWriter, TableFull
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import Addr, canonical
from voicerelay.wire.token import TokenError, TokenKeys

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

    __slots__ = ("client", "transceiver", "header", "ufrag", "slot", "packets_in", "packets_out")

    def __init__(
        self,
        client: Addr,
        transceiver: Addr,
        slot: int,
        ufrag: bytes = b"",
        packets_in: int = 0,
        packets_out: int = 0,
    ) -> None:
        self.client = client
        self.transceiver = transceiver
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
    ) -> None:
        self.keys = keys
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
        self.by_header: dict[bytes, LocalFlow] = {}
        self.dirty: set[LocalFlow] = set()
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.events = dict.fromkeys(
            ("flows_created", "flows_adopted", "flows_expired", "flows_rebound"), 0
        )
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        for record in table.records(shard):
            self._remember(
                record.client, record.transceiver, b"", self.writer.get(record.client)[0]
            )  # type: ignore[index]

    # Client -> transceiver ------------------------------------------------------------------
    def from_client(self, data: bytes, client: Addr, now: float) -> tuple[Addr, bytes] | None:
        """Where a client's datagram goes (transceiver, envelope), or None if dropped."""
        flow = self.flows.get(client)
        n = len(data)
        if flow is not None and 0 < n <= MAX_DATAGRAM and data[0] > 3:
            flow.packets_in += 1
            self.dirty.add(flow)
            self.packets_in += 1
            self.bytes_in += n
            return flow.transceiver, flow.header + data
        return self._from_client_slow(data, client, flow, now)

    def _from_client_slow(
        self, data: bytes, client: Addr, flow: LocalFlow | None, now: float
    ) -> tuple[Addr, bytes] | None:
        if not data:
            return self._drop("malformed")
        if len(data) > MAX_DATAGRAM:
            return self._drop("oversize")
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
        return flow.transceiver, flow.header + data

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
        try:
            slot = self.writer.put(client, record.transceiver, now)
        except TableFull:
            return None
        self.events["flows_adopted"] += 1
        return self._remember(client, record.transceiver, b"", slot)

    def _remember(self, client: Addr, transceiver: Addr, ufrag: bytes, slot: int) -> LocalFlow:
        flow = LocalFlow(client, transceiver, slot, ufrag)
        self.flows[client] = flow
        self.by_header[flow.header] = flow
        return flow

    def _forget(self, flow: LocalFlow) -> None:
        self.flows.pop(flow.client, None)
        self.by_header.pop(flow.header, None)
        self.dirty.discard(flow)

    # Transceiver -> client ------------------------------------------------------------------
    def from_transceiver(self, data: bytes, source: Addr, now: float) -> tuple[Addr, bytes] | None:
        """Where a transceiver's envelope goes (client, datagram), or None if dropped."""
        flow = self.by_header.get(data[:HEADER_SIZE])
        if flow is not None and flow.transceiver == source and len(data) <= MAX_ENVELOPE:
            flow.packets_out += 1
            self.dirty.add(flow)
            self.packets_out += 1
            self.bytes_out += len(data) - HEADER_SIZE
            return flow.client, data[HEADER_SIZE:]
        return self._from_transceiver_slow(data, source, flow)

    def _from_transceiver_slow(
        self, data: bytes, source: Addr, flow: LocalFlow | None
    ) -> tuple[Addr, bytes] | None:
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
        if canonical(hit[1].transceiver) != canonical(source):
            return self._drop("return_wrong_transceiver")
        self.packets_out += 1
        self.bytes_out += len(data) - HEADER_SIZE
        return client, data[HEADER_SIZE:]

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
        """Drop flows idle past the timeout (a slice of the shard per call)."""
        removed = self.writer.expire(now, self.idle_timeout, self.expire_budget)
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
    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1
        return None

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
