"""Every forwarding decision of a relay worker, as pure code (no sockets, no clock reads).

Peers are raw `struct sockaddr` bytes, as the worker's batched I/O (recvmmsg/sendmmsg) sees
them: `client_datagram` and `transceiver_datagram` are the hot path. `from_client` and
`from_transceiver` take and return `Addr` tuples instead, for callers that think in addresses.

Client -> transceiver: a known flow's RTP costs a dict lookup and one bytes concatenation of the
flow's cached envelope header with the datagram. What the relay carries is what RFC 7983 names
(`wire.demux`): STUN, DTLS, RTP/RTCP; any other first byte is dropped. The first packet of a
flow must be a STUN Binding request whose server ufrag is a routing token that opens and may
open a flow (below). A DTLS or RTP packet from an unknown address is looked up in this shard
(flows a previous incarnation of this worker left) and, only within `ADOPT_WINDOW` of a worker
starting (when the kernel may have moved clients between workers), in the other shards; at any
other time it is dropped as cheaply as it came, so junk from spoofed sources costs no more than
a forwarded packet.

Who may open a flow:
- the token is fresh (issued within `token_window` of now, wall clock) or in use (one of its
  flows, at any worker, carried return traffic within `idle_timeout`: workers mark such tokens
  in shared memory every `MARK_EVERY`, so a client whose NAT moves it to a new address and
  worker mid-call goes on); an address that already has a flow to the token's transceiver (any
  shard) keeps it, whatever the token's age;
- a token opens flows for at most `token_clients` client addresses (per worker);
- a source prefix (/24, /64) opens at most `new_flow_rate` flows a second (`new_flow_burst` at
  once, per worker);
- an established flow (one that carried return traffic within `rebind_after`) is never moved to
  another transceiver by a packet: the relay cannot check STUN integrity, so one spoofed check
  must not steal a call. A flow that never carried return traffic, or has been silent that
  long, may be rebound.
When the shard is full, the oldest flow that never carried return traffic is evicted to make
room before a new flow is refused.

Liveness counts return traffic only: a flow lives `idle_timeout` after its transceiver last
sent to the client (the `last_seen` written to shared memory), and a flow that never carried
any goes `unanswered_timeout` after it was created or adopted, whatever its client sends. An
honest transceiver answers every authenticated check at once; junk keeps nothing alive.

Transceiver -> client: only for a live flow binding that client to that transceiver, found by
the exact envelope header bytes (another dict lookup), else in the shared table.

Per-flow counters and return-traffic times stay in process and reach shared memory on `flush`,
called on a short timer: the hot path never writes shared memory.

ICE over TCP (RFC 6544; the framing and the connections are `relay.tcp`'s): a TCP connection's
frames go through `tcp_datagram` with the connection's peer sockaddr as key, and take the same
decisions as UDP datagrams (token freshness or use, clients per token, the prefix rate, rebinding,
RFC 7983 kinds, sizes), except that a TCP flow opens only from its connection's first frame (a
Binding request with a token: nothing is adopted) and lives in this worker alone: a connection
cannot outlive its process, so TCP flows never enter shared memory or snapshots. The envelope
names a client by address only, so one address is either a UDP flow or a TCP flow: a connection
whose address is a live flow anywhere in the table, or a UDP flow whose address is one of this
worker's TCP flows, is refused (`address_in_use`). A transceiver's envelope for a TCP client is
queued on `tcp_out` for the worker to write to the connection; TCP flows expire by the same
rules as UDP flows (`expire_tcp`).

The kernel fast path (`relay.fastpath`, opt-in): with `offload`, an answered UDP flow of
IPv4 addresses (not a TCP or hop flow) is handed to the kernel's flow map, which then forwards
its DTLS and RTP/RTCP both ways without this worker; STUN and everything unusual still come
here. The router alone decides: `take_kernel_ops` gives the worker what to put in or delete
from the map (a flow offloaded, a flow forgotten), and `kernel_activity` brings back what the
kernel forwarded (counters, the last return traffic), so counters, liveness, rebinding and
expiry work as without it.

The global hop (one relay-to-relay hop between clusters): a token naming another cluster goes,
enveloped, to that cluster's relay ingress (`cluster_routes`), which this relay treats as a
transceiver; its replies come back enveloped and leave to the client like any transceiver's.
Such a flow is an ordinary one here (shared memory, snapshots, adoption). The relay of the
token's cluster takes envelopes on its public socket (first byte 'V', which RFC 7983 leaves to
no WebRTC protocol) as datagrams of the enveloped client, through the upstream relay that sent
them (`hop_datagram`): the same admission as a client's (token of this cluster, freshness or
use, clients per token, the client's prefix rate), forwarded unchanged to the transceiver, and
the transceiver's replies go back, enveloped, only to that upstream relay (another worker of the
same upstream host may take the flow over, as when one of its workers restarts). Hop flows live
in this worker alone (shared memory names a client by address only, so a record could not say
replies go through an upstream relay); a restarted worker takes them up again at the client's
next consent check (their tokens are marked in use). A hop envelope whose token names yet
another cluster is refused (`hop_limit`): a datagram crosses at most one hop, so routes that
point at each other cannot loop. `hop_limit=0` turns hops off both ways.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from voicerelay.config import IpNetwork
from voicerelay.relay.admission import PrefixLimiter, prefix_of
from voicerelay.relay.fastpath.layout import flow_key, is_ipv4_sockaddr
from voicerelay.shm.flowtable import GENERATION_AT, FlowRecord, FlowTable, ShardWriter, TableFull
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import Addr, addr_from_sockaddr, canonical, sockaddr
from voicerelay.wire.demux import IS_RTP, IS_STUN, KIND_BY_FIRST_BYTE, PacketKind
from voicerelay.wire.token import Route, TokenError, TokenKeys

MOVED_AFTER = 1.0  # s silent here, with a fresher copy in another shard: the client moved
ADOPT_WINDOW = 3.0  # s after a worker starts during which unknown media searches other shards
MARK_EVERY = 5.0  # s between marks of a token in use (shared with the other workers)
MAX_DATAGRAM = 1500  # client datagrams above this are not WebRTC media: dropped as oversize
HEADER_SIZE = envelope.HEADER_SIZE
MAX_ENVELOPE = MAX_DATAGRAM + HEADER_SIZE
NO_SLOT = -1  # the slot of a TCP flow: it lives in this worker only, never in shared memory

DROP_REASONS = (
    "malformed",
    "oversize",
    "unknown_protocol",
    "unknown_flow",
    "bad_token",
    "token_old_format",
    "token_expired",
    "token_clients",
    "rate_limited",
    "rebind_refused",
    "foreign_cluster",
    "table_full",
    "transceiver_unreachable",
    "send_failed",
    "envelope_malformed",
    "envelope_version",
    "return_no_flow",
    "return_wrong_transceiver",
    "address_in_use",
    "hop_limit",
)
# What the TCP side of a worker counts (`relay.tcp`, published with the router's counters):
# connections open now, accepted; refused when full of routed ones, pending ones evicted for a
# newcomer, closed for a first frame that did not open a flow, for no first frame in time, for
# idleness, because their flow expired; frames over the size limit; packets to a client dropped
# because its connection's send buffer was full.
TCP_COUNTERS = (
    "tcp_connections",
    "tcp_accepted",
    "tcp_flows",
    "drop_tcp_over_limit",
    "drop_tcp_evicted",
    "drop_tcp_rejected",
    "drop_tcp_first_timeout",
    "tcp_closed_idle",
    "tcp_closed_expired",
    "drop_tcp_oversize",
    "drop_tcp_backpressure",
)
EVENTS = (
    "flows_created",
    "flows_adopted",
    "flows_expired",
    "flows_rebound",
    "flows_evicted",
    "shard_searches",
)
# Global hop: datagrams sent on to another cluster's relay, taken from an upstream relay, and
# replies sent back to an upstream relay.
HOP_COUNTERS = ("hops_out", "hops_in", "hops_back")
# Kernel fast path: datagrams (and their bytes) the kernel forwarded for this worker's flows
# (already included in packets_in/out and bytes_in/out), and flows it holds now.
KERNEL_TRAFFIC = ("kernel_packets_in", "kernel_bytes_in", "kernel_packets_out", "kernel_bytes_out")
KERNEL_COUNTERS = (*KERNEL_TRAFFIC, "kernel_flows")
COUNTER_FIELDS: tuple[str, ...] = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "flows",
    *EVENTS,
    *(f"drop_{reason}" for reason in DROP_REASONS),
    *TCP_COUNTERS,
    *HOP_COUNTERS,
    *KERNEL_COUNTERS,
)
_TOKEN_DROPS = {"old-format": "token_old_format"}  # every other TokenError: bad_token
_STUN, _UNKNOWN = PacketKind.STUN, PacketKind.UNKNOWN
_ENVELOPE_FIRST = envelope.MAGIC[0]  # an upstream relay's envelope (never a WebRTC packet)


def _same_host(a: bytes, b: bytes) -> bool:
    """Do two sockaddrs name the same IP (any port)?"""
    try:
        return addr_from_sockaddr(a)[0] == addr_from_sockaddr(b)[0]
    except ValueError:
        return False


def token_tag(ufrag: bytes) -> bytes:
    """The 8 bytes a token is marked under in shared memory (never all zero)."""
    return hashlib.blake2b(ufrag, digest_size=8).digest().replace(bytes(8), b"\x01" * 8)


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
        "flushed_out",
        "seen_at",
        "onward",
        "upstream",
        "flushed_in",
        "kernel_key",
        "kernel_seen",
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
        seen_at: float = 0.0,
    ) -> None:
        self.client = client
        self.transceiver = transceiver
        self.peer = peer  # the client's sockaddr on the public socket
        self.transceiver_peer = transceiver_peer  # the transceiver's, on the internal socket
        self.header = envelope.pack_header(client)
        self.ufrag = ufrag  # the last server ufrag (routing token) seen on this flow
        self.slot = slot
        self.packets_in = packets_in
        self.packets_out = packets_out
        self.flushed_out = packets_out  # packets_out at the last flush
        self.seen_at = seen_at  # last return traffic (as of a flush), else creation/adoption
        self.onward = False  # its "transceiver" is another cluster's relay ingress
        self.upstream = False  # came through an upstream relay (`peer` is that relay's)
        self.flushed_in = packets_in  # packets_in at the last flush (hop counters)
        self.kernel_key = b""  # its key in the kernel's flow map, once offloaded
        self.kernel_seen = (0, 0, 0, 0)  # the kernel's counters as last taken in

    def last_return(self, now: float) -> float:
        """When the transceiver last sent to this client (`now` if since the last flush)."""
        return now if self.packets_out != self.flushed_out else self.seen_at


class RelayRouter:
    """The forwarding state of one worker: its flows, its shard, its admission, its counters."""

    def __init__(
        self,
        keys: TokenKeys,
        table: FlowTable,
        shard: int,
        *,
        cluster_id: int = 0,
        idle_timeout: float = 30.0,
        cluster_routes: dict[int, Addr] | None = None,
        hop_limit: int = 1,
        hop_peers: Sequence[IpNetwork] = (),
        expire_interval: float = 0.1,
        public_family: int = socket.AF_INET,
        internal_family: int = socket.AF_INET,
        token_window: float = 30.0,
        token_clients: int = 4,
        new_flow_rate: float = 100.0,
        new_flow_burst: int = 200,
        rebind_after: float = 10.0,
        unanswered_timeout: float = 10.0,
        offload: bool = False,
        now: float = 0.0,
        wall_offset: float = 0.0,
    ) -> None:
        """`now` is the monotonic time the worker starts (it opens the adoption window);
        `wall_offset` is wall clock minus monotonic clock (tokens carry wall-clock times),
        kept current by the caller. `offload`: hand answered flows to the kernel fast path
        (only when both sockets are IPv4)."""
        self.keys = keys
        self.public_family = public_family
        self.internal_family = internal_family
        self.table = table
        self.shard_index = shard
        self.writer: ShardWriter = table.shard(shard)
        self.cluster_id = cluster_id
        self.hop_limit = hop_limit  # relay-to-relay hops a datagram may take (0 or 1)
        self.hop_peers = tuple(hop_peers)  # who may send us hop envelopes
        self._hop_peer_ok: dict[bytes, bool] = {}  # sockaddr -> allowed (bounded)
        self.cluster_routes = {c: canonical(a) for c, a in (cluster_routes or {}).items()}
        self.route_addrs = frozenset(self.cluster_routes.values())
        self.idle_timeout = idle_timeout
        self.token_window = token_window
        self.token_clients = token_clients
        self.rebind_after = rebind_after
        self.unanswered_timeout = unanswered_timeout
        self.wall_offset = wall_offset
        self.limiter = PrefixLimiter(new_flow_rate, new_flow_burst)
        # Sweep the whole shard within half the shortest timeout, a slice per timer tick.
        ticks = max(1.0, min(idle_timeout, unanswered_timeout) / 2 / expire_interval)
        self.expire_budget = max(64, int(table.capacity / ticks) + 1)
        self.flows: dict[Addr, LocalFlow] = {}
        self.by_peer: dict[bytes, LocalFlow] = {}
        self.by_header: dict[bytes, LocalFlow] = {}
        self.by_token: dict[bytes, set[LocalFlow]] = {}
        self.marked: dict[bytes, float] = {}  # token -> when this worker last marked it
        self.unanswered: dict[LocalFlow, None] = {}  # oldest first: eviction candidates
        # TCP flows (this worker's only), by their connection's peer sockaddr and by header;
        # what transceivers sent them, for the worker to write to their connections.
        self.tcp_by_peer: dict[bytes, LocalFlow] = {}
        self.tcp_by_header: dict[bytes, LocalFlow] = {}
        self.tcp_out: list[tuple[bytes, bytes]] = []  # (connection peer, datagram)
        # Hop flows (this worker's only), by upstream sockaddr + header, and by header.
        self.hop_by_key: dict[bytes, LocalFlow] = {}
        self.hop_by_header: dict[bytes, LocalFlow] = {}
        self.hops = dict.fromkeys(HOP_COUNTERS, 0)
        self.hops_swept_at = now
        self.dirty: set[LocalFlow] = set()
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.offload = offload and public_family == internal_family == socket.AF_INET
        self.offloaded: dict[bytes, LocalFlow] = {}  # kernel key -> flow the kernel forwards
        self.kernel_ops: dict[bytes, LocalFlow | None] = {}  # key -> put (flow) or delete
        self.kernel = dict.fromkeys(KERNEL_TRAFFIC, 0)
        self.events = dict.fromkeys(EVENTS, 0)
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.junk = [0] * 256  # unknown-address drops on the fast path, by first byte
        # Flows already in this shard (a restarted worker's) are adopted on their first packet,
        # so starting costs the same at any table size.
        self._table_buf = table.buf
        self.generation = table.bump_generation()
        self.adopt_until = now + ADOPT_WINDOW

    # Client -> transceiver ------------------------------------------------------------------
    def client_datagram(self, data: bytes, peer: bytes, now: float) -> tuple[bytes, bytes] | None:
        """Where a client's datagram goes: (transceiver sockaddr, envelope), or None if dropped.

        `peer` is the client's sockaddr as the public socket reported it."""
        flow = self.by_peer.get(peer)
        n = len(data)
        if flow is not None:
            if 0 < n <= MAX_DATAGRAM and IS_RTP[data[0]]:
                flow.packets_in += 1
                self.dirty.add(flow)
                self.packets_in += 1
                self.bytes_in += n
                return flow.transceiver_peer, flow.header + data
        elif n and data[0] == _ENVELOPE_FIRST and self.hop_limit and self._is_hop_peer(peer):
            return self.hop_datagram(data, peer, now)
        elif (
            0 < n <= MAX_DATAGRAM
            and not IS_STUN[data[0]]
            and now > self.adopt_until
            and self.writer.used <= len(self.flows)
            and self._table_buf[GENERATION_AT] == self.generation
        ):  # an unknown address, nothing to adopt: junk costs this much and no more
            self.junk[data[0]] += 1
            return None
        return self._client_slow(data, peer, flow, now)

    def from_client(self, data: bytes, client: Addr, now: float) -> tuple[Addr, bytes] | None:
        """`client_datagram` in addresses: (transceiver, envelope), or None if dropped."""
        try:
            peer = sockaddr(client, self.public_family)
        except ValueError:
            return self._drop("malformed")
        routed = self.client_datagram(data, peer, now)
        return None if routed is None else (addr_from_sockaddr(routed[0]), routed[1])

    def _is_hop_peer(self, peer: bytes) -> bool:
        """Is `peer` an upstream relay (`hop_peers`)? Only they may send hop envelopes: an
        envelope names its client, which would let anyone else pick the client address the
        new-flow limits are charged to."""
        known = self._hop_peer_ok.get(peer)
        if known is None:
            if not self.hop_peers:
                return False
            host = ipaddress.ip_address(addr_from_sockaddr(peer)[0])
            if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
                host = host.ipv4_mapped
            known = any(host in net for net in self.hop_peers if net.version == host.version)
            if len(self._hop_peer_ok) >= 4096:
                self._hop_peer_ok.clear()
            self._hop_peer_ok[peer] = known
        return known

    def hop_datagram(self, data: bytes, peer: bytes, now: float) -> tuple[bytes, bytes] | None:
        """Where an upstream relay's envelope goes: (transceiver sockaddr, envelope), or None
        if dropped (counted). `peer` is the upstream relay's sockaddr on the public socket."""
        flow = self.hop_by_key.get(peer + data[:HEADER_SIZE])
        n = len(data) - HEADER_SIZE
        if flow is not None and 0 < n <= MAX_DATAGRAM and IS_RTP[data[HEADER_SIZE]]:
            flow.packets_in += 1
            self.dirty.add(flow)
            self.packets_in += 1
            self.bytes_in += n
            self.hops["hops_in"] += 1
            return flow.transceiver_peer, data
        return self._hop_slow(data, peer, flow, now)

    def _hop_slow(
        self, data: bytes, peer: bytes, flow: LocalFlow | None, now: float
    ) -> tuple[bytes, bytes] | None:
        if len(data) > MAX_ENVELOPE:
            return self._drop("oversize")
        try:
            client = envelope.unpack_header(data)
        except envelope.EnvelopeError as exc:
            return self._drop(
                "envelope_version" if exc.reason == "version" else "envelope_malformed"
            )
        inner = data[HEADER_SIZE:]
        if not inner:
            return self._drop("malformed")
        kind = KIND_BY_FIRST_BYTE[inner[0]]
        if kind is _UNKNOWN:
            return self._drop("unknown_protocol")
        if flow is None:
            flow = self._hop_flow_elsewhere(client, peer)
        if kind is _STUN:
            ufrag = stun.binding_server_ufrag(inner)
            if ufrag is not None and (flow is None or flow.peer != peer or ufrag != flow.ufrag):
                flow = self._route_hop(ufrag, client, peer, flow, now)
                if flow is None:
                    return None
        if flow is None or flow.peer != peer:
            return self._drop("unknown_flow")
        flow.packets_in += 1
        self.dirty.add(flow)
        self.packets_in += 1
        self.bytes_in += len(inner)
        self.hops["hops_in"] += 1
        return flow.transceiver_peer, flow.header + inner

    def _hop_flow_elsewhere(self, client: Addr, peer: bytes) -> LocalFlow | None:
        """The client's hop flow through another upstream sockaddr: taken over here when that
        is another worker of the same upstream host (one of its workers restarted), else
        returned as it is (only a Binding request with a token may rebind it)."""
        flow = self.hop_by_header.get(envelope.pack_header(client))
        if flow is not None and _same_host(flow.peer, peer):
            del self.hop_by_key[flow.peer + flow.header]
            flow.peer = peer
            self.hop_by_key[peer + flow.header] = flow
        return flow

    def _route_hop(
        self, ufrag: bytes, client: Addr, peer: bytes, flow: LocalFlow | None, now: float
    ) -> LocalFlow | None:
        """The hop flow a Binding request from upstream relay `peer` goes by (None: dropped,
        counted): only tokens of this cluster (a second hop is refused: `hop_limit`)."""
        if flow is None:
            if self._address_in_use(client, tcp=True) or self._tcp_address(client):
                return self._drop("address_in_use")
            if not self.limiter.allows(prefix_of(client), now):
                return self._drop("rate_limited")
        try:
            route = self.keys.open(ufrag)
        except TokenError as exc:
            if flow is not None and flow.peer != peer:
                return self._drop(_TOKEN_DROPS.get(exc.reason, "bad_token"))
            return self._unopened(exc, ufrag, flow)
        if route.cluster_id != self.cluster_id:
            return self._drop("hop_limit")
        transceiver = canonical(route.transceiver)
        if flow is not None and flow.transceiver == transceiver and flow.peer == peer:
            self._retag(flow, ufrag)
            return flow
        fresh = route.fresh(now + self.wall_offset, self.token_window)
        return self._open_flow(ufrag, client, transceiver, flow, fresh, now, upstream=peer)

    def _tcp_address(self, client: Addr) -> bool:
        """Is `client` one of this worker's TCP flows?"""
        if not self.tcp_by_peer:
            return False
        try:
            return sockaddr(client, self.public_family) in self.tcp_by_peer
        except ValueError:  # an enveloped client of the other family: not on this socket
            return False

    def tcp_datagram(self, data: bytes, peer: bytes, now: float) -> tuple[bytes, bytes] | None:
        """Where a frame from a TCP connection goes: (transceiver sockaddr, envelope), or None
        if dropped (counted). `peer` is the connection's peer sockaddr (`wire.addr.sockaddr`
        of its canonical address, public family). Before a connection has a flow, only a
        Binding request with a routing token that may open one gets through."""
        flow = self.tcp_by_peer.get(peer)
        n = len(data)
        if flow is not None and 0 < n <= MAX_DATAGRAM and IS_RTP[data[0]]:
            flow.packets_in += 1
            self.dirty.add(flow)
            self.packets_in += 1
            self.bytes_in += n
            return flow.transceiver_peer, flow.header + data
        return self._client_slow(data, peer, flow, now, tcp=True)

    def _client_slow(
        self, data: bytes, peer: bytes, flow: LocalFlow | None, now: float, tcp: bool = False
    ) -> tuple[bytes, bytes] | None:
        n = len(data)
        if not n:
            return self._drop("malformed")
        if n > MAX_DATAGRAM:
            return self._drop("oversize")
        kind = KIND_BY_FIRST_BYTE[data[0]]
        if kind is _UNKNOWN:
            return self._drop("unknown_protocol")
        if kind is _STUN:
            ufrag = stun.binding_server_ufrag(data)
            if ufrag is not None and (flow is None or ufrag != flow.ufrag):
                flow = self._route_by_token(ufrag, peer, flow, now, tcp)
                if flow is None:
                    return None
        if flow is None:
            flow = None if tcp else self._adopt(peer, now)
            if flow is None:
                return self._drop("unknown_flow")
        flow.packets_in += 1
        self.dirty.add(flow)
        self.packets_in += 1
        self.bytes_in += n
        return flow.transceiver_peer, flow.header + data

    def _route_by_token(
        self, ufrag: bytes, peer: bytes, flow: LocalFlow | None, now: float, tcp: bool = False
    ) -> LocalFlow | None:
        """The flow a Binding request with this server ufrag goes by (None: dropped, counted).
        A TCP connection's first request only opens a new flow (nothing is adopted)."""
        if flow is None:
            try:
                client = addr_from_sockaddr(peer)
            except ValueError:
                return self._drop("malformed")
            if self._address_in_use(client, tcp):
                return self._drop("address_in_use")
            flow = None if tcp else self._adopt_own(client, now)
            if flow is None and not self.limiter.allows(prefix_of(client), now):
                return self._drop("rate_limited")  # refused before the token costs a decryption
        else:
            client = flow.client
        try:
            route = self.keys.open(ufrag)
        except TokenError as exc:
            return self._unopened(exc, ufrag, flow)
        transceiver = self._destination(route)
        if transceiver is None:
            return self._drop("foreign_cluster")
        fresh = route.fresh(now + self.wall_offset, self.token_window)
        if flow is None and not tcp and (not fresh or self._searching(now)):
            flow = self._adopt_foreign(client, now)
        if flow is not None and flow.transceiver == transceiver:
            self._retag(flow, ufrag)  # the same call, or a new session to the same place
            return flow
        return self._open_flow(ufrag, client, transceiver, flow, fresh, now, tcp)

    def _address_in_use(self, client: Addr, tcp: bool) -> bool:
        """Is `client` already a flow of the other transport? (The envelope names a client by
        address only.) A TCP connection checks every shard (once per connection); a UDP
        client's first request checks this worker's TCP flows."""
        if self.hop_by_header and envelope.pack_header(client) in self.hop_by_header:
            return True  # a hop flow's client, through an upstream relay
        if not tcp:
            return self._tcp_address(client)
        return client in self.flows or self.table.lookup(client) is not None

    def _unopened(self, exc: TokenError, ufrag: bytes, flow: LocalFlow | None) -> LocalFlow | None:
        """A token that does not open. An old-format token still continues a flow that already
        goes where it names (calls bound before an upgrade); nothing else gets through."""
        route = exc.route
        if flow is not None and route is not None and self._destination(route) == flow.transceiver:
            self._retag(flow, ufrag)
            return flow
        return self._drop(_TOKEN_DROPS.get(exc.reason, "bad_token"))

    def _destination(self, route: Route) -> Addr | None:
        """Where a route's packets go from this relay: its transceiver, or the next hop."""
        if route.cluster_id == self.cluster_id:
            return canonical(route.transceiver)
        if not self.hop_limit:
            return None
        return self.cluster_routes.get(route.cluster_id)

    def _open_flow(
        self,
        ufrag: bytes,
        client: Addr,
        transceiver: Addr,
        flow: LocalFlow | None,
        fresh: bool,
        now: float,
        tcp: bool = False,
        upstream: bytes | None = None,
    ) -> LocalFlow | None:
        """A new flow (or `flow` rebound) to `transceiver`, if admission allows it. A TCP flow
        takes no shared-memory slot (the worker caps its connections), nor does a hop flow
        (through the `upstream` relay's sockaddr)."""
        if not fresh and not self._token_in_use(ufrag, now):
            return self._drop("token_expired")
        if flow is not None and self._established(flow, now):
            return self._drop("rebind_refused")
        users = self.by_token.get(ufrag)
        if users is not None and len(users) >= self.token_clients:
            return self._drop("token_clients")
        if not self._reachable(transceiver):
            return self._drop("transceiver_unreachable")
        if not self.limiter.take(prefix_of(client), now):
            return self._drop("rate_limited")
        slot = NO_SLOT if tcp or upstream else self._put(client, transceiver, now)
        if slot is None:
            return self._drop("table_full")
        if flow is not None:
            self.events["flows_rebound"] += 1
            self._forget(flow)
        else:
            self.events["flows_created"] += 1
        return self._remember(client, transceiver, ufrag, slot, now, upstream=upstream)

    def _established(self, flow: LocalFlow, now: float) -> bool:
        """Did the flow's transceiver send to the client within `rebind_after`? Then no
        unauthenticated packet moves it elsewhere."""
        return flow.packets_out > 0 and now - flow.last_return(now) <= self.rebind_after

    def _token_in_use(self, ufrag: bytes, now: float) -> bool:
        """Has one of this token's flows (here, or at another worker) carried return traffic
        within the idle timeout?"""
        if any(
            f.packets_out and now - f.last_return(now) <= self.idle_timeout
            for f in self.by_token.get(ufrag, ())
        ):
            return True
        marked = self.table.token_marked(token_tag(ufrag))
        return marked is not None and now - marked <= self.idle_timeout

    def _put(
        self, client: Addr, transceiver: Addr, now: float, packets_in: int = 0, packets_out: int = 0
    ) -> int | None:
        """A slot for a new flow; when the shard is full, flows that never carried return
        traffic give way, oldest first. None if nothing can."""
        while True:
            try:
                return self.writer.put(client, transceiver, now, packets_in, packets_out)
            except TableFull:
                if not self._evict_one():
                    return None

    def _evict_one(self) -> bool:
        while self.unanswered:
            victim = next(iter(self.unanswered))
            del self.unanswered[victim]
            if victim.packets_out:  # answered since the last flush: it stays
                continue
            if self.writer.evict(victim.client):
                self._forget(victim)
                self.events["flows_evicted"] += 1
                return True
        return False

    # Adoption -------------------------------------------------------------------------------
    def _searching(self, now: float) -> bool:
        """May a miss search the other shards? Only within `ADOPT_WINDOW` of a worker start."""
        generation = self._table_buf[GENERATION_AT]
        if generation != self.generation:
            self.generation = generation
            self.adopt_until = now + ADOPT_WINDOW
        return now <= self.adopt_until

    def _adopt(self, peer: bytes, now: float) -> LocalFlow | None:
        """A DTLS/RTP packet from an address this worker does not know: a flow left in this
        shard, or (within the adoption window) another worker's, taken over; else None."""
        own = self.writer.used > len(self.flows)
        searching = self._searching(now)
        if not own and not searching:
            return None
        try:
            client = addr_from_sockaddr(peer)
        except ValueError:
            return None
        if self._address_in_use(client, tcp=False):
            return None
        flow = self._adopt_own(client, now)
        if flow is None and searching:
            flow = self._adopt_foreign(client, now)
        return flow

    def _adopt_own(self, client: Addr, now: float) -> LocalFlow | None:
        """A flow in this shard that this worker does not know yet (a restarted worker's)."""
        if self.writer.used <= len(self.flows):
            return None
        found = self.writer.get(client)
        if found is None:
            return None
        slot, record = found
        if not self._reachable(record.transceiver):
            return None
        return self._remember_record(record, slot, now)

    def _adopt_foreign(self, client: Addr, now: float) -> LocalFlow | None:
        """Another worker's flow for `client` (the kernel moved the client here), copied into
        this shard; that worker's sweep drops its copy once this one is fresher (the
        transceiver answers through this worker) and it has gone silent."""
        self.events["shard_searches"] += 1
        hit = self.table.lookup(client, skip=self.shard_index)
        if hit is None:
            return None
        _, record = hit
        if not self._reachable(record.transceiver):
            return None
        slot = self._put(
            client, record.transceiver, record.last_seen, record.packets_in, record.packets_out
        )
        if slot is None:
            return None
        self.events["flows_adopted"] += 1
        return self._remember_record(record, slot, now)

    def _remember_record(self, record: FlowRecord, slot: int, now: float) -> LocalFlow:
        """A flow found in shared memory, as it was: its counters, its last return traffic
        (an adopted flow that never carried any starts its unanswered time again)."""
        return self._remember(
            record.client,
            record.transceiver,
            b"",
            slot,
            record.last_seen if record.packets_out else now,
            record.packets_in,
            record.packets_out,
        )

    def _reachable(self, transceiver: Addr) -> bool:
        try:
            sockaddr(transceiver, self.internal_family)
        except ValueError:
            return False
        return True

    # Local flow state -----------------------------------------------------------------------
    def _remember(
        self,
        client: Addr,
        transceiver: Addr,
        ufrag: bytes,
        slot: int,
        seen_at: float,
        packets_in: int = 0,
        packets_out: int = 0,
        upstream: bytes | None = None,
    ) -> LocalFlow:
        flow = LocalFlow(
            client,
            transceiver,
            upstream or sockaddr(client, self.public_family),
            sockaddr(transceiver, self.internal_family),
            slot,
            b"",
            packets_in,
            packets_out,
            seen_at,
        )
        flow.onward = transceiver in self.route_addrs
        if upstream:
            flow.upstream = True
            self.hop_by_key[upstream + flow.header] = flow
            self.hop_by_header[flow.header] = flow
        elif slot == NO_SLOT:
            self.tcp_by_peer[flow.peer] = flow
            self.tcp_by_header[flow.header] = flow
        else:
            self.flows[client] = flow
            self.by_peer[flow.peer] = flow
            self.by_header[flow.header] = flow
            if not packets_out:
                self.unanswered[flow] = None
        self._retag(flow, ufrag)
        return flow

    def _retag(self, flow: LocalFlow, ufrag: bytes) -> None:
        """File `flow` under the token it now goes by."""
        if flow.ufrag == ufrag:
            return
        self._untag(flow)
        flow.ufrag = ufrag
        if ufrag:
            self.by_token.setdefault(ufrag, set()).add(flow)

    def _untag(self, flow: LocalFlow) -> None:
        users = self.by_token.get(flow.ufrag)
        if users is not None:
            users.discard(flow)
            if not users:
                del self.by_token[flow.ufrag]
                self.marked.pop(flow.ufrag, None)

    def _forget(self, flow: LocalFlow) -> None:
        if flow.upstream:
            self.hop_by_key.pop(flow.peer + flow.header, None)
            self.hop_by_header.pop(flow.header, None)
        elif flow.slot == NO_SLOT:
            self.tcp_by_peer.pop(flow.peer, None)
            self.tcp_by_header.pop(flow.header, None)
        else:
            self.flows.pop(flow.client, None)
            self.by_peer.pop(flow.peer, None)
            self.by_header.pop(flow.header, None)
        self.dirty.discard(flow)
        self.unanswered.pop(flow, None)
        self._untag(flow)
        if flow.kernel_key:
            self.offloaded.pop(flow.kernel_key, None)
            self.kernel_ops[flow.kernel_key] = None
            flow.kernel_key = b""

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
        if flow is None and self.hop_by_header:  # a hop flow's reply: back to its upstream
            hop = self.hop_by_header.get(data[:HEADER_SIZE])
            if hop is not None:
                return self._to_upstream(hop, data, peer)
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
        tcp = self.tcp_by_header.get(data[:HEADER_SIZE])
        if tcp is not None:
            return self._to_tcp(tcp, data, peer)
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

    def _to_tcp(self, flow: LocalFlow, data: bytes, peer: bytes) -> None:
        """Queue a transceiver's datagram for a TCP flow's connection (on `tcp_out`); always
        None: nothing goes out on the public UDP socket."""
        if flow.transceiver_peer != peer:
            return self._drop("return_wrong_transceiver")
        flow.packets_out += 1
        self.dirty.add(flow)
        self.packets_out += 1
        self.bytes_out += len(data) - HEADER_SIZE
        self.tcp_out.append((flow.peer, data[HEADER_SIZE:]))
        return None

    def _to_upstream(self, flow: LocalFlow, data: bytes, peer: bytes) -> tuple[bytes, bytes] | None:
        """A transceiver's envelope for a hop flow: back, as it is, to the upstream relay that
        forwarded the flow (and to no one else)."""
        if len(data) > MAX_ENVELOPE:
            return self._drop("oversize")
        if flow.transceiver_peer != peer:
            return self._drop("return_wrong_transceiver")
        flow.packets_out += 1
        self.dirty.add(flow)
        self.packets_out += 1
        self.bytes_out += len(data) - HEADER_SIZE
        self.hops["hops_back"] += 1
        return flow.peer, data

    def tcp_closed(self, peer: bytes) -> None:
        """A TCP connection is gone: its flow (if any) with it."""
        flow = self.tcp_by_peer.get(peer)
        if flow is not None:
            self._forget(flow)

    def expire_tcp(self, now: float) -> list[bytes]:
        """Forget TCP flows past the rules UDP flows expire by (return traffic silent past the
        idle timeout; never answered, past `unanswered_timeout`); the peers of their
        connections, for the worker to close. Every TCP flow is looked at: call it about once
        a second (the worker caps its connections)."""
        gone = [f for f in self.tcp_by_peer.values() if self._tcp_expired(f, now)]
        for flow in gone:
            self._forget(flow)
        self.events["flows_expired"] += len(gone)
        return [flow.peer for flow in gone]

    def _tcp_expired(self, flow: LocalFlow, now: float) -> bool:
        if not flow.packets_out:
            return now - flow.seen_at > self.unanswered_timeout
        return now - flow.last_return(now) > self.idle_timeout

    # Timers ---------------------------------------------------------------------------------
    def flush(self, now: float) -> int:
        """Write activity of flows that moved since the last flush to shared memory: counters,
        and as `last_seen` the last time the transceiver sent to the client."""
        touch = self.writer.touch
        unanswered = self.unanswered
        count = len(self.dirty)
        for flow in self.dirty:
            if flow.onward:
                self.hops["hops_out"] += flow.packets_in - flow.flushed_in
                flow.flushed_in = flow.packets_in
            out = flow.packets_out
            if out != flow.flushed_out:
                flow.flushed_out = out
                flow.seen_at = now
                unanswered.pop(flow, None)
                if flow.ufrag:
                    self._mark(flow.ufrag, now)
            if flow.slot != NO_SLOT:
                touch(flow.slot, flow.seen_at, flow.packets_in, out)
                if out and self.offload and not flow.kernel_key and not flow.upstream:
                    self._offload(flow)
        self.dirty.clear()
        return count

    # Kernel fast path -----------------------------------------------------------------------
    def _offload(self, flow: LocalFlow) -> None:
        """Hand an answered flow to the kernel (IPv4 clients only)."""
        if not is_ipv4_sockaddr(flow.peer) or not is_ipv4_sockaddr(flow.transceiver_peer):
            return
        key = flow_key(flow.peer)
        flow.kernel_key = key
        flow.kernel_seen = (0, 0, 0, 0)
        self.offloaded[key] = flow
        self.kernel_ops[key] = flow

    def take_kernel_ops(self) -> list[tuple[bytes, LocalFlow | None]]:
        """What the kernel's flow map must do since the last call, in order: (key, flow) to put
        the flow in, (key, None) to delete it. The worker applies them."""
        ops = list(self.kernel_ops.items())
        self.kernel_ops.clear()
        return ops

    def kernel_activity(
        self, key: bytes, counts: tuple[int, int, int, int], last_out: float, now: float
    ) -> bool:
        """Take in what the kernel forwarded for the flow under `key`: `counts` are its packets
        and bytes in, packets and bytes out since it was put in the map, `last_out` the
        monotonic time of its last datagram to the client. False if no offloaded flow of this
        worker has that key (the caller deletes it when the entry is this worker's)."""
        flow = self.offloaded.get(key)
        if flow is None:
            return False
        seen = flow.kernel_seen
        if any(c < s for c, s in zip(counts, seen, strict=True)):
            seen = (0, 0, 0, 0)  # the entry was put in again: counted from zero
        d_in, d_bin, d_out, d_bout = (c - s for c, s in zip(counts, seen, strict=True))
        flow.kernel_seen = counts
        if not (d_in or d_out):
            return True
        flow.packets_in += d_in
        self.packets_in += d_in
        self.bytes_in += d_bin
        self.kernel["kernel_packets_in"] += d_in
        self.kernel["kernel_bytes_in"] += d_bin
        if d_out:
            flow.packets_out += d_out
            flow.flushed_out += d_out  # its time is the kernel's, not the next flush's
            flow.seen_at = max(flow.seen_at, min(last_out, now))
            self.packets_out += d_out
            self.bytes_out += d_bout
            self.kernel["kernel_packets_out"] += d_out
            self.kernel["kernel_bytes_out"] += d_bout
            self.unanswered.pop(flow, None)
            if flow.ufrag:
                self._mark(flow.ufrag, now)
        self.dirty.add(flow)
        return True

    def adopt_offloaded(
        self, key: bytes, client: Addr, counts: tuple[int, int, int, int], now: float
    ) -> bool:
        """A flow of this shard the kernel forwards for this worker, left by its previous
        incarnation: known again here, offloaded as it is (its counters so far are not
        counted twice). False if the shard does not hold it (the caller deletes the entry)."""
        flow = self.flows.get(client)
        if flow is None:
            flow = self._adopt_own(client, now)
        if flow is None or flow.slot == NO_SLOT:
            return False
        if flow.kernel_key != key:
            if flow.kernel_key:
                self.offloaded.pop(flow.kernel_key, None)
            flow.kernel_key = key
            self.offloaded[key] = flow
        flow.kernel_seen = counts
        self.kernel_ops.pop(key, None)
        return True

    def _mark(self, ufrag: bytes, now: float) -> None:
        """Tell the other workers this token is in use (at most every `MARK_EVERY`)."""
        if now - self.marked.get(ufrag, float("-inf")) >= MARK_EVERY:
            self.marked[ufrag] = now
            self.writer.mark_token(token_tag(ufrag), now)

    def expire(self, now: float) -> list[Addr]:
        """Drop flows whose transceiver went silent past the idle timeout, flows that never
        carried return traffic past `unanswered_timeout`, and flows silent here while a fresher
        copy lives in another shard (adopted by another worker), a slice of the shard per call;
        forget a slice of refilled prefix buckets."""
        removed = self.writer.expire(
            now,
            self.idle_timeout,
            self.expire_budget,
            moved_after=MOVED_AFTER,
            unanswered_after=self.unanswered_timeout,
        )
        for client in removed:
            flow = self.flows.get(client)
            if flow is not None:
                self._forget(flow)
        self.events["flows_expired"] += len(removed)
        self.limiter.prune(now, self.expire_budget)
        if now - self.hops_swept_at >= 1.0:
            self.hops_swept_at = now
            self._expire_hops(now)
        return removed

    def _expire_hops(self, now: float) -> None:
        """Forget hop flows past the rules every flow expires by (about once a second)."""
        gone = [f for f in self.hop_by_key.values() if self._tcp_expired(f, now)]
        for flow in gone:
            self._forget(flow)
        self.events["flows_expired"] += len(gone)

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
            "flows": len(self.flows) + len(self.tcp_by_peer) + len(self.hop_by_key),
            "tcp_flows": len(self.tcp_by_peer),
            **self.events,
            **self.hops,
            **self.kernel,
            "kernel_flows": len(self.offloaded),
        }
        drops = dict(self.drops)
        for first, count in enumerate(self.junk):
            if count:
                known = KIND_BY_FIRST_BYTE[first] is not _UNKNOWN
                drops["unknown_flow" if known else "unknown_protocol"] += count
        values.update((f"drop_{reason}", count) for reason, count in drops.items())
        return values
