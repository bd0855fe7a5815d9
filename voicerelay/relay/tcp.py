"""ICE over TCP at the relay: RFC 4571 framing and one worker's TCP connections.

A client that cannot use UDP connects to the relay's TCP port (RFC 6544: answers list it as a
passive TCP candidate) and sends what it would have sent as datagrams, each prefixed with its
length (two bytes, big-endian: RFC 4571). Every frame goes through the worker's `RelayRouter`
(`tcp_datagram`: the same decisions as for UDP) and on to the transceiver in the same envelope,
so a transceiver cannot tell the difference. A transceiver answers through the worker its
client's traffic came from, so the replies reach the worker holding the connection, which
writes them back framed.

Sans-IO (bytes and `now` in, decisions out): `frame` and `FrameDecoder` (the codec), and
`ConnectionTable` (which connections a worker keeps). The asyncio shell: `TcpConnection` (one
connection) and `TcpService` (the listener; frames to transceivers in batches, replies to
connections, the sweep).

What a connection may do:
- its first frame must be a Binding request whose USERNAME starts with a routing token that may
  open a flow (the router's rules, as for UDP); anything else closes it (`drop_tcp_rejected`),
  and so does no first frame within `FIRST_FRAME_TIMEOUT` (`drop_tcp_first_timeout`);
- a worker keeps at most `limit` connections: when full, the oldest one without a flow yet is
  closed for a newcomer (`drop_tcp_evicted`); if every one has a flow, the newcomer is closed
  (`drop_tcp_over_limit`);
- a frame longer than the relay carries (`MAX_FRAME`, or empty) is skipped as it arrives, never
  buffered (`drop_tcp_oversize`): a connection holds at most one partial frame;
- replies are written only while the connection's send buffer is under `WRITE_HIGH`; beyond, they
  are dropped (`drop_tcp_backpressure`), as a congested UDP path would lose them;
- nothing received for the idle timeout (`tcp_closed_idle`), or its flow expired by the router's
  rules (`tcp_closed_expired`): closed.
A connection cannot outlive its worker process: docs/SNAPSHOTS.md says what a TCP client does
after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from voicerelay.net import family_of
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.relay.router import MAX_DATAGRAM, RelayRouter
from voicerelay.wire.addr import canonical, sockaddr

MAX_FRAME = MAX_DATAGRAM  # longer frames are not WebRTC media: skipped, counted
LENGTH = struct.Struct("!H")
FIRST_FRAME_TIMEOUT = 5.0  # s a new connection has to send its first frame
WRITE_HIGH = 64 * 1024  # bytes queued to a client beyond which its replies are dropped
WRITE_LOW = 16 * 1024  # ... until the queue drains below this
BACKLOG = 1024
SWEEP_INTERVAL = 1.0  # s between sweeps for idle connections and expired flows


# Sans-IO ------------------------------------------------------------------------------------
def frame(payload: bytes) -> bytes:
    """One RFC 4571 frame: the payload's length (2 bytes, big-endian), then the payload."""
    if not 0 < len(payload) <= 0xFFFF:
        raise ValueError(f"an RFC 4571 frame carries 1-65535 bytes, not {len(payload)}")
    return LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits one connection's byte stream into frames.

    `feed(data)` returns the complete frames in order. A frame longer than `max_frame`, or an
    empty one, is skipped as its bytes arrive, never buffered (`skipped` counts them), so at most
    `max_frame + 1` bytes are held between feeds (`buffered`).
    """

    __slots__ = ("max_frame", "skipped", "_held", "_skip")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.skipped = 0
        self._held = b""  # the start of an incomplete frame
        self._skip = 0  # bytes of a skipped frame still to come

    @property
    def buffered(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> list[bytes]:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
        if self._held:
            data = self._held + data
        frames = []
        pos, end, limit = 0, len(data), self.max_frame
        while end - pos >= 2:
            size = (data[pos] << 8) | data[pos + 1]
            start = pos + 2
            if size == 0 or size > limit:
                self.skipped += 1
                if end - start < size:
                    self._skip = size - (end - start)
                    pos = end
                    break
                pos = start + size
            elif end - start < size:
                break
            else:
                pos = start + size
                frames.append(data[start:pos])
        self._held = data[pos:]
        return frames


@dataclass(slots=True)
class ConnState:
    """What the table knows of one connection."""

    opened: float
    last_in: float  # when it last sent something (the shell writes it on every read)
    routed: bool = False  # its first frame opened a flow


TABLE_COUNTERS = (
    "tcp_accepted",
    "drop_tcp_over_limit",
    "drop_tcp_evicted",
    "drop_tcp_first_timeout",
    "tcp_closed_idle",
)


class ConnectionTable:
    """Which TCP connections a worker keeps, by key (the peer's sockaddr bytes).

    At most `limit` at once. A connection is pending until its first frame opens a flow
    (`route`); pending ones are the first to go (oldest first) when a newcomer finds the table
    full, and go anyway `first_frame_timeout` after they opened; routed ones go when they sent
    nothing for `idle_timeout`. `expired(now)` returns whatever is due; `counts` says why.
    """

    def __init__(
        self,
        limit: int,
        first_frame_timeout: float = FIRST_FRAME_TIMEOUT,
        idle_timeout: float = 30.0,
    ) -> None:
        self.limit = limit
        self.first_frame_timeout = first_frame_timeout
        self.idle_timeout = idle_timeout
        self.pending: dict[bytes, ConnState] = {}  # oldest first
        self.routed: dict[bytes, ConnState] = {}
        self.counts = dict.fromkeys(TABLE_COUNTERS, 0)

    def __len__(self) -> int:
        return len(self.pending) + len(self.routed)

    def open(self, key: bytes, now: float) -> tuple[ConnState | None, bytes | None]:
        """A new connection: (its state, or None if refused; the key of a pending connection
        closed to make room, or None). A key already present is replaced."""
        self.close(key)
        evicted = None
        if len(self) >= self.limit:
            if not self.pending:
                self.counts["drop_tcp_over_limit"] += 1
                return None, None
            evicted = next(iter(self.pending))
            del self.pending[evicted]
            self.counts["drop_tcp_evicted"] += 1
        state = ConnState(now, now)
        self.pending[key] = state
        self.counts["tcp_accepted"] += 1
        return state, evicted

    def route(self, key: bytes) -> None:
        """The connection's first frame opened a flow."""
        state = self.pending.pop(key, None)
        if state is not None:
            state.routed = True
            self.routed[key] = state

    def close(self, key: bytes) -> None:
        self.pending.pop(key, None)
        self.routed.pop(key, None)

    def expired(self, now: float) -> list[bytes]:
        """Connections to close now (removed here): pending past the first-frame deadline,
        routed ones silent past the idle timeout."""
        late = []
        for key, state in self.pending.items():  # oldest first
            if now - state.opened <= self.first_frame_timeout:
                break
            late.append(key)
        idle = [k for k, s in self.routed.items() if now - s.last_in > self.idle_timeout]
        for key in late:
            del self.pending[key]
        for key in idle:
            del self.routed[key]
        self.counts["drop_tcp_first_timeout"] += len(late)
        self.counts["tcp_closed_idle"] += len(idle)
        return late + idle


# The asyncio shell ----------------------------------------------------------------------------
def listen_tcp(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking TCP socket listening on (host, port) in the port's SO_REUSEPORT group
    (every worker listens on the same port; the kernel spreads connections)."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class TcpConnection(asyncio.Protocol):
    """One client connection: frames in to the service, replies out framed."""

    def __init__(self, service: TcpService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.key = b""
        self.state: ConnState | None = None  # None: not (or no longer) kept
        self.decoder = FrameDecoder()
        self.paused = False  # the send buffer is above WRITE_HIGH

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.service.opened(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is None:
            return
        service = self.service
        now = service.clock()
        state.last_in = now
        decoder = self.decoder
        skipped = decoder.skipped
        frames = decoder.feed(data)
        if decoder.skipped != skipped and not service.oversize(self, decoder.skipped - skipped):
            return
        if frames:
            service.frames_in(self, frames, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def send(self, datagram: bytes) -> bool:
        """Write one datagram framed; False (not written) while the send buffer is full."""
        if self.paused or self.transport is None:
            return False
        self.transport.write(LENGTH.pack(len(datagram)) + datagram)
        return True


@dataclass
class TcpSettings:
    """Where a worker listens for ICE over TCP, how many connections it keeps, and how long
    one may stay silent."""

    host: str
    port: int
    limit: int = 1024  # connections this worker keeps
    idle_timeout: float = 30.0


SERVICE_COUNTERS = ("drop_tcp_rejected", "tcp_closed_expired", "drop_tcp_oversize")


class TcpService:
    """A worker's TCP side: the listener (bound when constructed, so a taken port fails the
    worker's start), its connections, frames to transceivers through `batch` (sent on the
    worker's internal socket), replies from the router's `tcp_out` (`deliver`, after each batch
    from transceivers), and the periodic `sweep`."""

    def __init__(
        self,
        router: RelayRouter,
        internal: socket.socket,
        batch: DatagramBatch,
        settings: TcpSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.internal_fd = internal.fileno()
        self.batch = batch
        self.clock = clock
        self.table = ConnectionTable(settings.limit, FIRST_FRAME_TIMEOUT, settings.idle_timeout)
        self.connections: dict[bytes, TcpConnection] = {}
        self.counts = dict.fromkeys(SERVICE_COUNTERS, 0)
        self.backpressure_drops = 0
        self.sock = listen_tcp(settings.host, settings.port)
        self.server: asyncio.AbstractServer | None = None
        self._next_sweep = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpConnection(self), sock=self.sock, backlog=BACKLOG
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()
        for conn in list(self.connections.values()):
            self._discard(conn, abort=True)

    # Connections ------------------------------------------------------------------------------
    def opened(self, conn: TcpConnection) -> None:
        transport = conn.transport
        assert transport is not None
        try:
            client = canonical(transport.get_extra_info("peername")[:2])
            key = sockaddr(client, self.router.public_family)
        except (TypeError, ValueError):
            self.counts["drop_tcp_rejected"] += 1
            transport.abort()
            return
        old = self.connections.get(key)
        if old is not None:  # the same address and port again: the old connection is gone
            self._discard(old, abort=True)
        state, evicted = self.table.open(key, self.clock())
        if evicted is not None:
            self._discard(self.connections[evicted], abort=True)
        if state is None:
            transport.abort()
            return
        conn.key, conn.state = key, state
        self.connections[key] = conn
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def lost(self, conn: TcpConnection) -> None:
        if conn.state is not None and self.connections.get(conn.key) is conn:
            self._discard(conn, abort=False)

    def _discard(self, conn: TcpConnection, *, abort: bool) -> None:
        """Forget a connection (its table entry, its flow) and close it."""
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
            self.table.close(conn.key)
            self.router.tcp_closed(conn.key)
        conn.state = None
        if conn.transport is not None:
            if abort:
                conn.transport.abort()
            else:
                conn.transport.close()

    def _reject(self, conn: TcpConnection) -> None:
        self.counts["drop_tcp_rejected"] += 1
        self._discard(conn, abort=True)

    # Frames -----------------------------------------------------------------------------------
    def oversize(self, conn: TcpConnection, count: int) -> bool:
        """Frames skipped for their size; False if that closed the connection (it had no flow
        yet: its first frame is what opens one)."""
        self.counts["drop_tcp_oversize"] += count
        if conn.state is not None and not conn.state.routed:
            self._reject(conn)
            return False
        return True

    def frames_in(self, conn: TcpConnection, frames: list[bytes], now: float) -> None:
        """A connection's frames through the router, the envelopes out in batches. A connection
        whose first frame opens no flow is closed."""
        route = self.router.tcp_datagram
        batch, size, n = self.batch, self.batch.size, 0
        key, state = conn.key, conn.state
        assert state is not None
        for data in frames:
            routed = route(data, key, now)
            if routed is None:
                if not state.routed:
                    self._reject(conn)
                    break
                continue
            if not state.routed:
                self.table.route(key)
            batch.put(n, routed[1], routed[0])
            n += 1
            if n == size:
                self._send(n)
                n = 0
        if n:
            self._send(n)

    def _send(self, count: int) -> None:
        _, failed = self.batch.send(self.internal_fd, count)
        if failed:
            self.router.count_send_failures(failed)

    def deliver(self) -> None:
        """Write what transceivers sent TCP clients (the router's `tcp_out`) to their
        connections."""
        out = self.router.tcp_out
        if not out:
            return
        connections = self.connections
        for peer, datagram in out:
            conn = connections.get(peer)
            if conn is not None and not conn.send(datagram):
                self.backpressure_drops += 1
        out.clear()

    # Timers -----------------------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """At most every `SWEEP_INTERVAL`: close connections whose flow expired (the router's
        rules), that sent no first frame in time, or that went idle."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        for key in self.router.expire_tcp(now):
            conn = self.connections.get(key)
            if conn is not None:
                self.counts["tcp_closed_expired"] += 1
                self._discard(conn, abort=False)
        for key in self.table.expired(now):  # counted by the table
            conn = self.connections.get(key)
            if conn is not None:
                self._discard(conn, abort=False)

    def counters(self) -> dict[str, int]:
        """The TCP counters (`router.TCP_COUNTERS`) but the router's own (`tcp_flows`)."""
        return {
            "tcp_connections": len(self.connections),
            **self.table.counts,
            **self.counts,
            "drop_tcp_backpressure": self.backpressure_drops,
        }
