"""The transceiver's I/O shell: one UDP endpoint for every session, one timer for all of them.

Datagrams arrive from relay workers as envelopes, and only from relays: a sender outside the
configured relay networks (`--relays`) is dropped and counted before its datagram is read.
STUN checks find their session by the server ufrag in USERNAME (the routing token we minted);
everything else by the client address, bound to a session by an authenticated check (the
session's `AddressChanged` and `AddressChecked` events; at most `MAX_CLIENT_ADDRESSES` per
call). Replies go back as envelopes to the relay worker that last sent for that client
something the session authenticated (an unauthenticated packet never re-points a call). A
session's failure never touches another's state.

A call's voice app is the codec-free echo, or (with a `VoiceAgent`) a decoded-audio
`CallAudio` whose events the call's `AgentCall` hands to the agent's task. Each call also has an
`EventFeed` of conversation events for pages. The address map changes only through the
session's `AddressChanged` events.

After any input to a call (a datagram, its timer, its agent) the server transmits what the
session queued, acts on its events and re-arms its timer; echo media only transmits (unless
it moved the call to a new client address, which raises an event).

The socket is moved in batches (`BatchedEndpoint`, recvmmsg/sendmmsg through
`voicerelay.relay.mmsg`): every datagram of a batch goes through `datagram_received`, and what
the batch made the sessions send leaves with one sendmmsg at its end. The one timer flushes
what its calls sent the same way (paced agent audio, DTLS retransmissions, RTCP, the goodbye
of a call that timed out); anything else (signaling, an agent's wake-up, closing) is sent at
once. A full send buffer drops and counts (`send_failed`), as UDP would.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from voicerelay.config import IpNetwork
from voicerelay.metrics import CallHistograms, FunctionCollector, transceiver_families
from voicerelay.net import bind_udp
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.transceiver import sdp
from voicerelay.transceiver.apps import EchoApp, VoiceApp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.config import TransceiverConfig
from voicerelay.transceiver.feed import EventFeed
from voicerelay.transceiver.session import (
    SECURE,
    AddressChanged,
    AddressChecked,
    DtlsConnected,
    IceConnected,
    Session,
    SessionClosed,
    SessionConfig,
)
from voicerelay.voice.app import AgentCall, VoiceAgent, run_agent
from voicerelay.voice.bridge import BridgeConfig, RealtimeBridge
from voicerelay.voice.pipeline import AudioConfig, CallAudio
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import (
    SOCKADDR_IN6_SIZE,
    SOCKADDR_IN_SIZE,
    Addr,
    addr_from_sockaddr,
    sockaddr,
)
from voicerelay.wire.demux import IS_RTP, IS_STUN
from voicerelay.wire.token import TokenKeys

log = logging.getLogger("voicerelay.transceiver")


CLIENT_CACHE_LIMIT = 65536  # envelope headers remembered (cleared whole when full)
RELAY_CACHE_LIMIT = 1024  # relay verdicts remembered per kind (cleared whole when full)
NOT_A_RELAY_WARNINGS = 8  # hosts named in a warning when refused; later ones only counted
MAX_CLIENT_ADDRESSES = 8  # client addresses routed to one call (its media address kept)
# The event loop's timers fire on millisecond ticks (libuv), so up to a millisecond before the
# time asked for: what is due within that is due now, or the loop would spin until it is.
TIMER_SLACK = 0.001
AGENT_GRACE = 5.0  # seconds an agent may take to wind down after its call ended
BATCH = 64  # datagrams per recvmmsg and per sendmmsg
SLOT = 2048  # bytes a datagram slot: above the largest envelope a relay forwards (1522)
MAX_BATCHES = 16  # receive batches a wake-up before the loop runs timers and signaling
ADDRESS_CACHE_LIMIT = 1024  # relay addresses converted from/to raw sockaddrs (cleared when full)


class SessionLimit(Exception):
    """No room for another session."""


class Draining(SessionLimit):
    """New sessions are refused: this transceiver is draining."""


class TurnTimedFeed(EventFeed):
    """A call's feed that also times the agent's turns: from the caller's turn end to the
    agent starting its reply (observed once per turn, on those events)."""

    def __init__(self, created: float, observe: Callable[[float], None]) -> None:
        super().__init__(created)
        self._observe = observe
        self._turn_ended: float | None = None

    def publish(self, type: str, now: float, **fields: Any) -> None:
        if type == "user.turn_ended":
            self._turn_ended = now
        elif type == "agent.speaking" and self._turn_ended is not None:
            self._observe(max(0.0, now - self._turn_ended))
            self._turn_ended = None
        super().publish(type, now, **fields)


class RelayFilter:
    """Which senders may hand this transceiver envelopes: hosts in the relay networks.

    `allows(host)` parses a host the first time; the verdict is remembered (`known`,
    `refused`; each bounded), so the hot path asks only `host in known`."""

    def __init__(self, networks: Iterable[IpNetwork]) -> None:
        networks = tuple(networks)
        self.v4 = tuple(n for n in networks if n.version == 4)
        self.v6 = tuple(n for n in networks if n.version == 6)
        self.known: set[str] = set()
        self.refused: set[str] = set()

    def allows(self, host: str) -> bool:
        """True if `host` (as a socket reports it) is inside one of the relay networks."""
        if host in self.known:
            return True
        if host in self.refused:
            return False
        verdict = self._inside(host)
        seen = self.known if verdict else self.refused
        if len(seen) >= RELAY_CACHE_LIMIT:
            seen.clear()
        seen.add(host)
        return verdict

    def _inside(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])  # no IPv6 scope id
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 relay seen through a dual-stack socket
        networks = self.v4 if ip.version == 4 else self.v6
        return any(ip in network for network in networks)


@dataclass(slots=True)
class Call:
    """A session and where its packets go."""

    id: str
    ufrag: bytes
    session: Session
    created: float
    feed: EventFeed  # conversation events for pages
    relay_for: dict[Addr, tuple] = field(default_factory=dict)  # client -> relay worker (as seen)
    headers: dict[Addr, bytes] = field(default_factory=dict)  # client -> its envelope header
    clients: dict[Addr, None] = field(default_factory=dict)  # routed here, oldest first
    media_to: Addr | None = None  # the session's media address (its last AddressChanged)
    timer: float | None = None
    connected_at: float | None = None
    secure_at: float | None = None
    agent_call: AgentCall | None = None  # the agent's handle (decoded-audio calls)
    agent_task: asyncio.Task | None = None
    moves_timer: bool = False  # media can move the session's timer (decoded audio)


def _new_header(call: Call, client: Addr) -> bytes:
    """The envelope header for `client`, kept on the call for its later packets."""
    header = call.headers[client] = envelope.pack_header(client)
    return header


def random_ice_password() -> str:
    return base64.b64encode(os.urandom(18)).decode()  # 24 ice-chars


# The socket -----------------------------------------------------------------------------------
_FLOWINFO = struct.Struct("!I")  # sockaddr_in6 at offset 4, network byte order
_SCOPE = struct.Struct("=I")  # sockaddr_in6 at offset 24, host byte order


def peer_address(raw: bytes) -> tuple:
    """The address of `struct sockaddr_in`/`sockaddr_in6` bytes as the event loop reports a
    peer: (host, port), or (host, port, flowinfo, scope_id) for IPv6."""
    host, port = addr_from_sockaddr(raw)
    if len(raw) < SOCKADDR_IN6_SIZE:
        return (host, port)
    return (host, port, _FLOWINFO.unpack_from(raw, 4)[0], _SCOPE.unpack_from(raw, 24)[0])


def peer_sockaddr(addr: tuple, family: int) -> bytes:
    """`struct sockaddr` bytes for an address as `peer_address` gives it, on a socket of
    `family` (an IPv4 host on an IPv6 socket is mapped). Raises ValueError or struct.error
    for what is no address of that family."""
    raw = sockaddr((addr[0], addr[1]), family)
    if family == socket.AF_INET6 and len(addr) == 4:
        raw = raw[:4] + _FLOWINFO.pack(addr[2]) + raw[8:24] + _SCOPE.pack(addr[3])
    return raw


class BatchedEndpoint:
    """The server's UDP socket on the event loop, moved in batches (recvmmsg, sendmmsg).

    When the socket is readable: receive up to `BATCH` datagrams, hand each to
    `receive(data, relay, now)` (`relay` as a socket reports a peer; one clock read a batch),
    then send what the batch queued in `queue` with sendmmsg (`BATCH` a call); again while
    batches come back full, at most `MAX_BATCHES` a wake-up, so a burst cannot starve the
    loop's timers. Senders append (datagram, relay) to `queue` (a list that stays the same
    object) and call `flush` unless `holding` (inside a batch, or between `hold` and `flush`).

    Counted in `counters`, never raised: `send_failed` (a full send buffer, an address the
    kernel refuses, a datagram longer than a slot: none of the server's is), `drop_oversize`
    (a datagram longer than a slot arrived: no relay forwards one), `socket_errors` (recvmmsg
    failed), `internal_errors` (`receive` raised: logged, the batch goes on); `batches_in`,
    `batches_out` (recvmmsg and sendmmsg calls that moved datagrams). The socket keeps the
    buffers it was made with.
    """

    def __init__(
        self,
        sock: socket.socket,
        receive: Callable[[bytes, tuple, float], None],
        counters: Counter[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        namelen = SOCKADDR_IN6_SIZE if sock.family == socket.AF_INET6 else SOCKADDR_IN_SIZE
        self.rx = DatagramBatch(BATCH, SLOT, namelen)
        self.tx = DatagramBatch(BATCH, SLOT, namelen)
        self.receive = receive
        self.counters = counters
        self.clock = clock
        self.queue: list[tuple[bytes, tuple]] = []  # (datagram, relay) to send at `flush`
        self.holding = False
        self._relays: dict[bytes, tuple] = {}  # raw sockaddr -> address as reported
        self._names: dict[tuple, bytes] = {}  # and back (every address `receive` was given)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the socket on `loop`."""
        loop.add_reader(self.fd, self.on_readable)
        self._loop = loop

    def close(self) -> None:
        """Send what is queued, stop reading, close the socket."""
        self.flush()
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None
        self.sock.close()

    # Receiving --------------------------------------------------------------------------------
    def on_readable(self) -> None:
        rx, counters = self.rx, self.counters
        for _ in range(MAX_BATCHES):
            try:
                n = rx.recv(self.fd)
            except OSError:  # e.g. a queued ICMP error: nothing to read this time
                counters["socket_errors"] += 1
                return
            if not n:
                return
            counters["batches_in"] += 1
            self.holding = True
            try:
                self._receive_batch(n)
            finally:
                self.flush()
            if n < BATCH:
                return

    def _receive_batch(self, n: int) -> None:
        receive, relays, now = self.receive, self._relays, self.clock()
        for data, name in self.rx.received(n):
            if len(data) >= SLOT:  # truncated to the slot
                self.counters["drop_oversize"] += 1
                continue
            try:
                receive(data, relays.get(name) or self._relay_of(name), now)
            except Exception:  # a bug must not cost the rest of the batch
                self.counters["internal_errors"] += 1
                log.exception("a datagram from %s failed", name.hex())

    def _relay_of(self, name: bytes) -> tuple:
        relay = peer_address(name)
        if len(self._relays) >= ADDRESS_CACHE_LIMIT:
            self._relays.clear()
            self._names.clear()
        self._relays[name] = relay
        self._names[relay] = name
        return relay

    # Sending ----------------------------------------------------------------------------------
    def hold(self) -> None:
        """Leave what is queued in `queue` until `flush`."""
        self.holding = True

    def flush(self) -> None:
        """Send everything queued, `BATCH` datagrams a sendmmsg; stop holding."""
        self.holding = False
        queue = self.queue
        while queue:
            chunk = queue[:BATCH]
            del queue[:BATCH]
            self._send(chunk)

    def _send(self, chunk: list[tuple[bytes, tuple]]) -> None:
        try:
            count, left_out = self.tx.put_all(chunk, self._names)
        except KeyError:  # an address whose sockaddr was forgotten (the cache was full)
            chunk = [item for item in chunk if self._known(item[1])]
            count, left_out = self.tx.put_all(chunk, self._names)
        failed = left_out
        if count:
            self.counters["batches_out"] += 1
            failed += self.tx.send(self.fd, count)[1]
        if failed:
            self.counters["send_failed"] += failed

    def _known(self, relay: tuple) -> bool:
        """Make sure `_names` has `relay`'s sockaddr; False (counted) for no address."""
        if relay in self._names:
            return True
        try:
            name = peer_sockaddr(relay, self.family)
        except (ValueError, OSError, struct.error, TypeError, IndexError):
            self.counters["send_failed"] += 1
            return False
        if len(self._names) >= ADDRESS_CACHE_LIMIT:
            self._names.clear()
        self._names[relay] = name
        return True


class TransceiverServer(asyncio.DatagramProtocol):
    """Every session of this process, multiplexed on one UDP endpoint."""

    def __init__(
        self,
        config: TransceiverConfig,
        keys: TokenKeys,
        certificate: Certificate | None = None,
        clock=time.monotonic,
        agent: VoiceAgent | None = None,
    ) -> None:
        self.config = config
        if agent is None and config.agent_url is not None:
            agent = RealtimeBridge(BridgeConfig(config.agent_url, config.agent_key))
        self.agent = agent  # None: every call is an echo
        self.keys = keys
        self.certificate = certificate or Certificate.generate()
        self.clock = clock
        self.calls: dict[str, Call] = {}
        self.by_ufrag: dict[bytes, Call] = {}
        self.by_client: dict[Addr, Call] = {}
        self.endpoint: BatchedEndpoint | None = None  # the internal port, once started
        self.transport: asyncio.DatagramTransport | None = None  # instead, if one is made
        # Where `_transmit` puts (datagram, relay): the endpoint's queue, or the transport.
        self._send: Callable[[tuple[bytes, tuple]], None] = self._send_through_transport
        self.internal_addr: Addr = config.internal
        self.session_config = SessionConfig(
            consent_timeout=config.consent_timeout, connect_timeout=config.connect_timeout
        )
        self.relay_filter = RelayFilter(config.relay_networks)
        self._relay_hosts = self.relay_filter.known  # the hot path's view of it
        self._warned_hosts: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.closed_reasons: Counter[str] = Counter()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._clients: dict[bytes, Addr] = {}  # envelope header -> client (headers seen valid)
        self._agent_tasks: set[asyncio.Task] = set()
        # Health and metrics: draining refuses new sessions; the registry reads the gauges and
        # counters at scrape time and holds histograms observed on call events.
        self.draining = False
        self._drained: asyncio.Event | None = None
        self.lost_in_closed_calls = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            FunctionCollector(lambda: transceiver_families(self.metrics_stats()))
        )
        self.histograms = CallHistograms(self.registry)

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the internal port and serve it in batches on the running loop."""
        # Every session shares this socket: the kernel's default buffer (~200 KB, about 250
        # datagrams) holds only ~10 ms of traffic at load, so any pause would drop audio.
        sock = bind_udp(*self.config.internal, reuse_port=False)
        endpoint = BatchedEndpoint(sock, self.datagram_received, self.counters, self.clock)
        endpoint.start(asyncio.get_running_loop())
        self.endpoint = endpoint
        self._send = endpoint.queue.append
        self.internal_addr = sock.getsockname()[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send through an asyncio transport instead (datagrams then arrive one at a time
        through `datagram_received`)."""
        self.transport = transport  # type: ignore[assignment]

    def _send_through_transport(self, item: tuple[bytes, tuple]) -> None:
        if self.transport is not None:
            self.transport.sendto(*item)

    def close(self) -> None:
        now = self.clock()
        for call in list(self.calls.values()):
            call.session.close(now, "server-stopped")
            self._after_input(call, now)
        for task in self._agent_tasks:
            task.cancel()
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.transport is not None:
            self.transport.close()

    # Signaling --------------------------------------------------------------------------------
    def create_session(
        self, offer_sdp: str, relay_public: tuple[Addr, ...] | None = None
    ) -> tuple[str, str]:
        """Accept an offer: returns (session id, answer SDP); the answer lists `relay_public`
        (default: the configured relay addresses). Raises SdpError, SessionLimit."""
        offer = sdp.parse_offer(offer_sdp)
        if self.draining:
            raise Draining("this transceiver is draining: place the call on another one")
        if len(self.calls) >= self.config.max_sessions:
            raise SessionLimit(f"this transceiver is full ({self.config.max_sessions} sessions)")
        now = self.clock()
        ufrag = self.keys.seal(self.config.cluster_id, self.internal_addr, time.time())
        pwd = random_ice_password()
        ssrc = int.from_bytes(os.urandom(4), "big")
        dtls_role = sdp.answer_dtls_role(offer)
        app: VoiceApp
        if self.agent is None:
            app = EchoApp(ssrc)
        else:
            app = CallAudio(
                ssrc=ssrc,
                payload_type=offer.opus_pt,
                config=AudioConfig(agent_rate=self.agent.sample_rate),
            )
        session = Session(
            ice_role="lite",
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote_ufrag=offer.ice_ufrag,
            remote_pwd=offer.ice_pwd,
            dtls_role=dtls_role,
            certificate=self.certificate,
            remote_fingerprint=offer.fingerprint,
            now=now,
            app=app,
            config=self.session_config,
            ssrc=ssrc,
        )
        feed = TurnTimedFeed(now, self.histograms.agent_turn.observe)
        call = Call(os.urandom(8).hex(), ufrag.encode(), session, now, feed)
        if isinstance(app, CallAudio):
            call.moves_timer = True
            call.agent_call = AgentCall(
                call.id, app, wake=lambda: self._wake(call), clock=self.clock, feed=call.feed
            )
        self.calls[call.id] = call
        self.by_ufrag[call.ufrag] = call
        self._schedule(call)
        self.counters["sessions_created"] += 1
        answer = sdp.build_answer(
            offer,
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprint=self.certificate.fingerprint,
            dtls_role=dtls_role,
            candidate=relay_public or self.config.relay_public,
            tcp_port=self.config.relay_tcp_port,
            ssrc=ssrc,
            cname=f"voicerelay-{call.id[:8]}",
        )
        return call.id, answer

    def delete_session(self, call_id: str) -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        now = self.clock()
        call.session.close(now, "deleted")
        self._after_input(call, now)
        return True

    def session_stats(self, call_id: str) -> dict[str, Any] | None:
        call = self.calls.get(call_id)
        if call is None:
            return None
        stats = {"id": call.id, "age": self.clock() - call.created, **call.session.stats}
        if call.agent_call is not None:
            stats["audio"] = call.agent_call.audio.stats
        return stats

    def feed(self, call_id: str) -> EventFeed | None:
        """The conversation events of a session (None: no such session)."""
        call = self.calls.get(call_id)
        return call.feed if call is not None else None

    @property
    def cached_headers(self) -> int:
        """Envelope headers remembered as valid (at most `CLIENT_CACHE_LIMIT`)."""
        return len(self._clients)

    # Health and metrics ---------------------------------------------------------------------
    def drain(self) -> asyncio.Event:
        """Refuse new sessions from now on and close those not yet secure (their clients
        retry elsewhere at once rather than set up a call that must end soon); secure calls
        go on. The event is set once no call is left."""
        self.draining = True
        if self._drained is None:
            self._drained = asyncio.Event()
        now = self.clock()
        for call in [c for c in self.calls.values() if c.secure_at is None]:
            call.session.close(now, "draining")
            self._after_input(call, now)
        if not self.calls:
            self._drained.set()
        return self._drained

    def not_ready(self) -> str | None:
        """Why this transceiver takes no new session (draining, full), or None."""
        if self.draining:
            return "draining"
        if len(self.calls) >= self.config.max_sessions:
            return "full"
        return None

    def metrics_stats(self) -> dict[str, Any]:
        """What the scrape-time metrics read (docs/OPERATIONS.md)."""
        live_lost = sum(max(0, c.session.rx.lost) for c in self.calls.values())
        return {
            "states": Counter(c.session.state for c in self.calls.values()),
            "created": self.counters["sessions_created"],
            "closed": self.closed_reasons,
            "lost": self.lost_in_closed_calls + live_lost,
            "draining": self.draining,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.calls),
            "internal": list(self.internal_addr),
            "counters": dict(self.counters),
            "closed": dict(self.closed_reasons),
            "states": dict(Counter(c.session.state for c in self.calls.values())),
            "app": "echo" if self.agent is None else type(self.agent).__name__,
            "agent": dict(getattr(self.agent, "counters", {})),
        }

    # Datagrams --------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, relay: tuple, now: float | None = None) -> None:
        """One envelope from `relay` (as a socket reports it), received at `now` (default:
        the clock). What it makes a session send is queued on the endpoint (sent at the end
        of the batch, or at once outside one) or sent through `transport`."""
        host = relay[0]
        if host not in self._relay_hosts and not self.relay_filter.allows(host):
            self._not_a_relay(host)
            return
        client = self._clients.get(data[: envelope.HEADER_SIZE])
        if client is None:
            client = self._read_header(data)
            if client is None:
                return
        payload = data[envelope.HEADER_SIZE :]
        if not payload:
            self.counters["drop_empty"] += 1
            return
        if now is None:
            now = self.clock()
        first = payload[0]
        if IS_STUN[first]:
            ufrag = stun.binding_server_ufrag(payload)
            call = self.by_ufrag.get(ufrag) if ufrag is not None else self.by_client.get(client)
            if call is None:
                self.counters["drop_unknown_session"] += 1
                return
        else:
            call = self.by_client.get(client)
            if call is None:
                self.counters["drop_unknown_client"] += 1
                return
        session = call.session
        # A new relay for this client: noted only if the session authenticates the datagram.
        proven = -1 if call.relay_for.get(client) == relay else session.authenticated_in
        try:
            session.receive(payload, client, now)
        except Exception:  # a bug in one session must not take the process down
            log.exception("session %s failed on input; closing it", call.id)
            session.close(now, "internal-error")
        if proven >= 0 and session.authenticated_in != proven:
            self._repoint(call, client, relay)
        if (
            IS_RTP[first]
            and session.state == SECURE
            and not call.moves_timer
            and not session.pending_events
        ):
            self._transmit(call)  # echo media moves no timer and raises no event (see Session)
        else:
            self._after_input(call, now)

    def _not_a_relay(self, host: str) -> None:
        """Count an envelope from outside `--relays`; name the first few such hosts in the log
        (a relay on another host that the option forgot looks exactly like this)."""
        self.counters["drop_not_a_relay"] += 1
        warned = self._warned_hosts
        if len(warned) < NOT_A_RELAY_WARNINGS and host not in warned:
            warned.add(host)
            log.warning(
                "dropping envelopes from %s: not in --relays %s (counted as drop_not_a_relay)",
                host,
                ",".join(self.config.relays),
            )

    def _repoint(self, call: Call, client: Addr, relay: tuple) -> None:
        """Replies to `client` go through `relay` from now on. A call remembers relays for its
        routed addresses; others are forgotten once it knows `MAX_CLIENT_ADDRESSES`."""
        relay_for = call.relay_for
        if client not in relay_for and len(relay_for) >= MAX_CLIENT_ADDRESSES:
            for stale in [c for c in relay_for if c not in call.clients]:
                del relay_for[stale]
                call.headers.pop(stale, None)
        relay_for[client] = relay

    def _read_header(self, data: bytes) -> Addr | None:
        """The client of an envelope whose header is not cached yet (None: dropped)."""
        try:
            client = envelope.unpack_header(data)
        except envelope.EnvelopeError as exc:
            self.counters[f"drop_envelope_{exc.reason}"] += 1
            return None
        if len(self._clients) >= CLIENT_CACHE_LIMIT:
            self._clients.clear()
        self._clients[bytes(data[: envelope.HEADER_SIZE])] = client
        return client

    def error_received(self, exc: Exception) -> None:
        self.counters["socket_errors"] += 1

    def _transmit(self, call: Call) -> None:
        """Envelope what the session has to send to the relay worker each client last used
        (queued on the endpoint, sent at once unless it is holding them for a batch)."""
        out = call.session.datagrams_to_send()
        if not out:
            return
        relay_for, headers, send = call.relay_for, call.headers, self._send
        for datagram, client in out:
            relay = relay_for.get(client)
            if relay is not None:
                send(((headers.get(client) or _new_header(call, client)) + datagram, relay))
        endpoint = self.endpoint
        if endpoint is not None and not endpoint.holding:
            endpoint.flush()

    def _after_input(self, call: Call, now: float) -> None:
        """After any input to a call (a datagram, its timer, its agent): transmit, act on its
        events, hand the agent its events, re-arm its timer."""
        session = call.session
        self._transmit(call)
        for event in session.events():
            if isinstance(event, IceConnected):
                call.connected_at = call.connected_at or now
            elif isinstance(event, AddressChanged):
                call.media_to = event.addr
                if event.addr is not None:
                    self._route(call, event.addr)  # nominated, re-nominated or proven
            elif isinstance(event, AddressChecked):
                self._route(call, event.addr)  # its media may reach the session to prove it
            elif isinstance(event, DtlsConnected):
                call.secure_at = now
                self.histograms.setup.observe(now - call.created)
                call.feed.publish("call.started", now)
                self._start_agent(call, now)
            elif isinstance(event, SessionClosed):
                self._reap(call, event.reason, now)
                return
        if call.agent_call is not None:
            call.agent_call.deliver()
        self._schedule(call)

    def _route(self, call: Call, client: Addr) -> None:
        """Datagrams from `client` reach `call`. A call keeps at most `MAX_CLIENT_ADDRESSES`:
        beyond, the least recently routed one other than its media address is forgotten."""
        clients = call.clients
        clients.pop(client, None)
        clients[client] = None
        self.by_client[client] = call
        if len(clients) > MAX_CLIENT_ADDRESSES:
            stale = next(c for c in clients if c != call.media_to)
            self._unroute(call, stale)

    def _unroute(self, call: Call, client: Addr) -> None:
        del call.clients[client]
        if self.by_client.get(client) is call:
            del self.by_client[client]
        call.relay_for.pop(client, None)
        call.headers.pop(client, None)

    def _wake(self, call: Call) -> None:
        """The agent queued or dropped audio: transmit what is due, re-arm the call's timer."""
        if self.calls.get(call.id) is call:
            self._after_input(call, self.clock())

    def _start_agent(self, call: Call, now: float) -> None:
        if call.agent_call is None or self.agent is None:
            return
        call.agent_call.audio.start(now)
        task = asyncio.get_running_loop().create_task(run_agent(self.agent, call.agent_call))
        call.agent_task = task
        self._agent_tasks.add(task)
        task.add_done_callback(self._agent_tasks.discard)

    def _reap(self, call: Call, reason: str, now: float) -> None:
        self.calls.pop(call.id, None)
        self.by_ufrag.pop(call.ufrag, None)
        for client in list(call.clients):
            self._unroute(call, client)
        self.closed_reasons[reason] += 1
        self._observe_closed(call)
        if call.agent_call is not None:
            call.agent_call.audio.end(now, reason)
            call.agent_call.deliver()
            task = call.agent_task
            if task is not None and not task.done():
                asyncio.get_running_loop().call_later(AGENT_GRACE, task.cancel)
        call.feed.close(now, reason)
        log.info("session %s closed: %s", call.id, reason)
        if self._drained is not None and not self.calls:
            self._drained.set()

    def _observe_closed(self, call: Call) -> None:
        """A call ended: its loss, jitter and RTT go to the metrics (a call that never
        carried media has no jitter to report)."""
        session = call.session
        self.lost_in_closed_calls += max(0, session.rx.lost)
        jitter = session.stats["jitter"] if session.rx.received else None
        self.histograms.call_closed(jitter, session.rtt)

    # One timer for all sessions ---------------------------------------------------------------
    def _schedule(self, call: Call) -> None:
        when = call.session.next_timer()
        if when is None or when == call.timer:
            return
        call.timer = when
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, call.id))
        self._arm()

    def _arm(self) -> None:
        if not self._heap:
            return
        earliest = self._heap[0][0]
        if self._timer_at is not None and self._timer_at <= earliest:
            return
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = earliest
        self._timer_handle = loop.call_at(
            loop.time() + max(0.0, earliest - self.clock()), self._on_timer
        )

    def _on_timer(self) -> None:
        """Run every call whose timer is due; what they send leaves in batches."""
        endpoint = self.endpoint
        if endpoint is None:
            self._run_due_timers()
            return
        endpoint.hold()
        try:
            self._run_due_timers()
        finally:
            endpoint.flush()

    def _run_due_timers(self) -> None:
        self._timer_at = None
        self._timer_handle = None
        clock_now = self.clock()
        due_by = clock_now + TIMER_SLACK
        while self._heap and self._heap[0][0] <= due_by:
            when, _, call_id = heapq.heappop(self._heap)
            call = self.calls.get(call_id)
            if call is None or call.timer != when:
                continue  # stale entry
            call.timer = None
            now = max(clock_now, when)  # woken up to a millisecond early: it is due
            try:
                call.session.handle_timer(now)
            except Exception:
                log.exception("session %s failed in a timer; closing it", call.id)
                call.session.close(now, "internal-error")
            self._after_input(call, now)
        self._arm()
