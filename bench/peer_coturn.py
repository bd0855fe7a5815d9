"""Relay vs coturn vs the C forwarder: CPU per relayed packet and max packets/s, same datagrams,
same rates, same run.

    .venv/bin/python bench/peer_coturn.py [--quick] [--rates 10000,20000,...] [--paths ...]

Paths, all around one C echo (the sink, standing in for a transceiver or a TURN peer):
- `direct`: generator -> sink, no forwarder (the floor of generator and sink);
- `c`: the C recvmmsg/sendmmsg forwarder (bench/c/forwarder.c, set up by bench/paths.py);
- `relay`: voicerelay with one worker (bench/paths.py);
- `coturn`: Debian coturn (`turnserver`, `make bench-setup` installs it) in the foreground with
  a config of its own: UDP only, one relay thread (`-m 1`), loopback peers allowed, a static
  long-term user. Each generator socket holds an allocation (Allocate, 401, Allocate with
  MESSAGE-INTEGRITY) and a channel binding to the sink; datagrams travel as ChannelData (4-byte
  header) both ways. Missing coturn is skipped with one line.

One load generator drives every path: this process with 64 connected client sockets, the
datagram prebuilt in C memory, sent with sendmmsg (8 a socket, round robin) every 2 ms and
drained with recvmmsg (`voicerelay.relay.mmsg`), so Python does no per-packet work. The payload
is 160 bytes on every path (coturn's client datagrams carry 4 more bytes of ChannelData header,
the relay's envelopes to the sink 22 more). Forwarder on the core under test; generator and sink
on the other. At each offered rate every path runs once in turn (all forwarders stay up, idle
between runs), so a ratio compares runs seconds apart on the same machine. A forwarded packet is
one datagram moved one way (a round trip through a forwarder is two). CPU per packet is shown
for runs under 1 % loss (`--cpu-loss-limit`); a path leaves the ramp after a run over that; its
max is the highest rate it carried with no loss at all (`--loss-limit`). A lossy run while other
processes used the forwarder's core is run again (`--retries`), and every run first waits a
while for others to leave our cores (`--quiet-wait`): the machine may be shared.

Budgets (issue 14): relay CPU per packet <= 0.9x coturn's and <= 1.15x the C forwarder at every
rate from 10k packets/s each way.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import harness
import paths
import psutil
from loadclient import CoreMeter, udp_drops

from tests.support.procs import free_ports, wait_for
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.wire import stun
from voicerelay.wire.addr import Addr, sockaddr

# TURN over the project's STUN codec (RFC 8656), sans-IO ---------------------------------------
ALLOCATE = 0x0003
CHANNEL_BIND = 0x0009
SUCCESS_BITS = 0x0100
ERROR_BITS = 0x0110
ATTR_CHANNEL_NUMBER = 0x000C
ATTR_XOR_PEER_ADDRESS = 0x0012
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_XOR_RELAYED_ADDRESS = 0x0016
ATTR_REQUESTED_TRANSPORT = 0x0019
UDP_TRANSPORT = bytes([17, 0, 0, 0])  # protocol number 17, then RFFU
FIRST_CHANNEL, LAST_CHANNEL = 0x4000, 0x4FFF
MAX_STALE_NONCES = 3  # 438 answers in a row before a flow gives up
_CHANNEL_HEADER = struct.Struct("!HH")
_CLASS_SUCCESS, _CLASS_ERROR = 2, 3


class TurnError(ValueError):
    """A datagram is not the TURN message expected; `reason` names why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key (RFC 8489 s9.2.2): MD5(username:realm:password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def channel_data(channel: int, payload: bytes) -> bytes:
    """A ChannelData message (RFC 8656 s12.4): channel, length, data; unpadded, as over UDP."""
    if not FIRST_CHANNEL <= channel <= LAST_CHANNEL:
        raise ValueError(f"channel 0x{channel:04x} is outside 0x4000-0x4FFF")
    if len(payload) > 0xFFFF:
        raise ValueError("ChannelData carries at most 65535 bytes")
    return _CHANNEL_HEADER.pack(channel, len(payload)) + payload


def parse_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel, payload) of a ChannelData message (UDP padding allowed); raises `TurnError`."""
    if len(data) < _CHANNEL_HEADER.size:
        raise TurnError("short")
    channel, length = _CHANNEL_HEADER.unpack_from(data)
    if not FIRST_CHANNEL <= channel <= LAST_CHANNEL:
        raise TurnError("channel")
    if length > len(data) - _CHANNEL_HEADER.size:
        raise TurnError("length")
    return channel, bytes(data[_CHANNEL_HEADER.size : _CHANNEL_HEADER.size + length])


# TurnFlow states, in the order a flow goes through them.
NEW = "new"
ALLOCATING = "allocating"  # unauthenticated Allocate sent: expecting 401 with realm and nonce
AUTHENTICATING = "authenticating"  # Allocate with MESSAGE-INTEGRITY sent
BINDING = "binding"  # ChannelBind sent (or resent to refresh channel and permission)
READY = "ready"  # ChannelData flows both ways
FAILED = "failed"
TURN_TRANSITIONS: dict[str, frozenset[str]] = {
    NEW: frozenset({ALLOCATING}),
    ALLOCATING: frozenset({AUTHENTICATING, BINDING, FAILED}),
    AUTHENTICATING: frozenset({BINDING, FAILED}),
    BINDING: frozenset({READY, FAILED}),
    READY: frozenset({BINDING}),
    FAILED: frozenset(),
}


class TurnFlow:
    """One client 5-tuple's allocation and channel binding to `peer`, sans-IO.

    `start()` gives the first request; every datagram from the server goes to `receive`, which
    returns the next request to send (or None); `pending()` is the request awaiting an answer,
    to resend on a timeout; `refresh()` rebinds the channel (which refreshes its permission).
    Anything unexpected is counted in `counters` and otherwise ignored; a refusal moves the flow
    to FAILED with `error` saying which request and code.
    """

    def __init__(
        self,
        username: str,
        password: str,
        peer: Addr,
        channel: int = FIRST_CHANNEL,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not FIRST_CHANNEL <= channel <= LAST_CHANNEL:
            raise ValueError(f"channel 0x{channel:04x} is outside 0x4000-0x4FFF")
        self.username, self.password, self.peer, self.channel = username, password, peer, channel
        self.random = random
        self.state = NEW
        self.realm: str | None = None
        self.nonce: bytes | None = None
        self.key: bytes | None = None
        self.relayed: Addr | None = None
        self.error: str | None = None
        self.counters = {
            "malformed": 0,
            "unexpected": 0,
            "bad_integrity": 0,
            "stale_nonce": 0,
        }
        self._tid = b""
        self._request: bytes | None = None
        self._stale_in_a_row = 0

    # Driving ----------------------------------------------------------------------------------
    def start(self) -> bytes:
        """The first Allocate (no credentials yet: the server answers 401 with realm, nonce)."""
        self._move(ALLOCATING)
        return self._send(ALLOCATE, [(ATTR_REQUESTED_TRANSPORT, UDP_TRANSPORT)])

    def pending(self) -> bytes | None:
        """The request still awaiting an answer (resend it as is on a timeout)."""
        return self._request

    def refresh(self) -> bytes:
        """Rebind the channel: keeps channel and permission alive (a READY flow only)."""
        self._move(BINDING)
        return self._channel_bind()

    def receive(self, data: bytes) -> bytes | None:
        """One datagram from the server; returns the next request, if any. Never raises."""
        try:
            msg = stun.parse(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return None
        if self._request is None or msg.transaction_id != self._tid:
            self.counters["unexpected"] += 1
            return None
        if msg.cls == _CLASS_ERROR:
            return self._on_error(msg)
        if msg.cls != _CLASS_SUCCESS:
            self.counters["unexpected"] += 1
            return None
        if self.key is not None and not stun.verify_integrity(data, self.key):
            self.counters["bad_integrity"] += 1
            return None
        self._stale_in_a_row = 0
        if msg.method == ALLOCATE and self.state in (ALLOCATING, AUTHENTICATING):
            return self._on_allocated(msg)
        if msg.method == CHANNEL_BIND and self.state == BINDING:
            self._request = None
            self._move(READY)
            return None
        self.counters["unexpected"] += 1
        return None

    # Answers ----------------------------------------------------------------------------------
    def _on_allocated(self, msg: stun.StunMessage) -> bytes | None:
        value = msg.get(ATTR_XOR_RELAYED_ADDRESS)
        try:
            if value is None:
                raise stun.StunError("attribute", "no XOR-RELAYED-ADDRESS")
            self.relayed = stun.decode_xor_address(value, msg.transaction_id)
        except stun.StunError as exc:
            return self._fail(f"Allocate success unreadable: {exc}")
        self._move(BINDING)
        return self._channel_bind()

    def _on_error(self, msg: stun.StunMessage) -> bytes | None:
        value = msg.get(stun.ATTR_ERROR_CODE)
        try:
            if value is None:
                raise stun.StunError("attribute", "no ERROR-CODE")
            code, reason = stun.decode_error_code(value)
        except stun.StunError:
            self.counters["malformed"] += 1
            return None
        realm, nonce = msg.get(ATTR_REALM), msg.get(ATTR_NONCE)
        if code == 401 and self.state == ALLOCATING and realm and nonce:
            self.realm, self.nonce = realm.decode("utf-8", "replace"), nonce
            self.key = long_term_key(self.username, self.realm, self.password)
            self._move(AUTHENTICATING)
            return self._send(ALLOCATE, [(ATTR_REQUESTED_TRANSPORT, UDP_TRANSPORT)])
        if code == 438 and nonce and self.key is not None:
            self._stale_in_a_row += 1
            self.counters["stale_nonce"] += 1
            if self._stale_in_a_row > MAX_STALE_NONCES:
                return self._fail(f"{MAX_STALE_NONCES} stale nonces in a row")
            self.nonce = nonce
            if self.state == BINDING:
                return self._channel_bind()
            return self._send(ALLOCATE, [(ATTR_REQUESTED_TRANSPORT, UDP_TRANSPORT)])
        what = "Allocate" if msg.method == ALLOCATE else f"method 0x{msg.method:03x}"
        if msg.method == CHANNEL_BIND:
            what = "ChannelBind"
        return self._fail(f"{what} refused: {code} {reason}".strip())

    # Requests ---------------------------------------------------------------------------------
    def _channel_bind(self) -> bytes:
        tid = self.random(12)
        attributes = [
            (ATTR_CHANNEL_NUMBER, struct.pack("!HH", self.channel, 0)),
            (ATTR_XOR_PEER_ADDRESS, stun.encode_xor_address(self.peer, tid)),
        ]
        return self._send(CHANNEL_BIND, attributes, tid)

    def _send(
        self, method: int, attributes: list[tuple[int, bytes]], tid: bytes | None = None
    ) -> bytes:
        """Build a request (with the long-term credentials once known) and keep it pending."""
        self._tid = tid = tid or self.random(12)
        if self.key is not None:
            assert self.realm is not None and self.nonce is not None
            attributes = [
                *attributes,
                (stun.ATTR_USERNAME, self.username.encode()),
                (ATTR_REALM, self.realm.encode()),
                (ATTR_NONCE, self.nonce),
            ]
        self._request = stun.build(method, tid, attributes, integrity_key=self.key)
        return self._request

    def _fail(self, why: str) -> None:
        self.error = why
        self._request = None
        self._move(FAILED)
        return None

    def _move(self, state: str) -> None:
        if state not in TURN_TRANSITIONS[self.state]:
            raise RuntimeError(f"TurnFlow cannot go from {self.state} to {state}")
        self.state = state

    @property
    def done(self) -> bool:
        return self.state == READY

    @property
    def failed(self) -> bool:
        return self.state == FAILED


class Probe:
    """One request and its answer, sans-IO: the relay's first packet (any answer will do) or a
    datagram that must come back as `accept` says (the check before each run)."""

    def __init__(self, request: bytes, accept: Callable[[bytes], bool] | None = None) -> None:
        self.request = request
        self.accept = accept
        self.done = False
        self.failed = False
        self.error: str | None = None
        self.counters = {"rejected": 0}

    def pending(self) -> bytes | None:
        """The request, until an acceptable answer came."""
        return None if self.done else self.request

    def receive(self, data: bytes) -> bytes | None:
        if self.done:
            return None
        if self.accept is None or self.accept(data):
            self.done = True
        else:
            self.counters["rejected"] += 1  # a stray or mangled answer: keep waiting
        return None


class Exchange(Protocol):
    """What `converse` drives on one socket (TurnFlow, Probe)."""

    error: str | None

    def pending(self) -> bytes | None: ...
    def receive(self, data: bytes) -> bytes | None: ...

    @property
    def done(self) -> bool: ...

    @property
    def failed(self) -> bool: ...


# The load generator ---------------------------------------------------------------------------
BATCH_PER_SOCKET = 8  # datagrams a socket sends per sendmmsg (the C generator's choice too)
TICK = 0.002  # the sender's pacing step
RECV_BATCH = 64
SETTLE = 0.5  # seconds to collect replies after the last send
SOCKET_BUFFER = 4 << 20
CONTENDED = 0.10  # others' share of the forwarder's core that makes a lossy run suspect
SATURATED = 0.95  # a forwarder this busy lost packets by itself


class ClientSockets:
    """`count` UDP sockets on 127.0.0.1, each connected to `server`: one flow each."""

    def __init__(self, count: int, server: Addr) -> None:
        self.server = server
        self.socks: list[socket.socket] = []
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            s.bind(("127.0.0.1", 0))
            s.connect(server)
            s.setblocking(False)
            self.socks.append(s)

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def converse(self, exchanges: list[Exchange], timeout: float, resend: float = 0.2) -> None:
        """Drive one exchange per socket until each is done or failed: send what each has
        pending (at once, then again every `resend` s), hand it every reply, send what it
        answers. Raises RuntimeError saying how many flows failed or got no answer."""
        by_fd = {s.fileno(): (s, x) for s, x in zip(self.socks, exchanges, strict=True)}
        deadline = time.monotonic() + timeout
        next_resend = 0.0
        with select.epoll() as ep:
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            while not all(x.done or x.failed for x in exchanges):
                now = time.monotonic()
                if now > deadline:
                    waiting = sum(not (x.done or x.failed) for x in exchanges)
                    raise RuntimeError(f"{waiting} of {len(exchanges)} flows got no answer")
                if now >= next_resend:
                    next_resend = now + resend
                    for s, x in by_fd.values():
                        if not (x.done or x.failed) and (request := x.pending()) is not None:
                            _send_quietly(s, request)
                for fd, _ in ep.poll(max(0.001, min(next_resend, deadline) - now)):
                    s, x = by_fd[fd]
                    for data in _queued(s):
                        if (reply := x.receive(data)) is not None:
                            _send_quietly(s, reply)
        failed = [x.error for x in exchanges if x.failed]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(exchanges)} flows failed: {failed[0]}")

    def flood(self, datagram: bytes, rate: float, seconds: float) -> dict[str, float]:
        """Offer `rate` datagrams/s (spread over the sockets) for `seconds`, then collect
        replies for SETTLE s. Returns sent, received, send_seconds and the generator's CPU."""
        out = DatagramBatch(BATCH_PER_SOCKET, len(datagram), 16)
        for i in range(BATCH_PER_SOCKET):
            out.put(i, datagram, sockaddr(self.server))
        inbox = DatagramBatch(RECV_BATCH, 2048, 16)
        fds = [s.fileno() for s in self.socks]
        sent = received = 0
        cpu0 = time.process_time()
        with select.epoll() as ep:
            for fd in fds:
                ep.register(fd, select.EPOLLIN)

            def drain(until: float) -> None:
                nonlocal received
                while (wait := until - time.monotonic()) > 0:
                    for fd, _ in ep.poll(wait):
                        while (n := inbox.recv(fd)) > 0:
                            received += n

            start = time.monotonic()
            end, due, which, tick_at = start + seconds, 0.0, 0, start
            while tick_at < end:
                due += rate * TICK
                todo = int(due)
                due -= todo
                while todo > 0:
                    n = min(todo, BATCH_PER_SOCKET)
                    sent += out.send(fds[which], n)[0]
                    todo -= n
                    which = (which + 1) % len(fds)
                tick_at += TICK
                drain(tick_at)
            send_seconds = time.monotonic() - start
            drain(time.monotonic() + SETTLE)
        return {
            "sent": sent,
            "received": received,
            "send_seconds": send_seconds,
            "generator_cpu_s": time.process_time() - cpu0,
        }


def _queued(s: socket.socket) -> list[bytes]:
    """Every datagram queued on a non-blocking socket (an ICMP error counts as none)."""
    out = []
    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
        while True:
            out.append(s.recv(4096))
    return out


def _send_quietly(s: socket.socket, data: bytes) -> None:
    """Send on a non-blocking socket; a full buffer or an ICMP error is a lost datagram."""
    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
        s.send(data)


# The paths under test -------------------------------------------------------------------------
@dataclass
class Lane:
    """One path under load: whose CPU counts, the generator's sockets and datagram for it, and
    how to (re)open its flows before a run."""

    name: str
    forwarder_pids: list[int]
    sockets: ClientSockets
    datagram: bytes
    prepare: Callable[[], None]
    steps: list[dict[str, Any]] = field(default_factory=list)
    contended: list[dict[str, Any]] = field(default_factory=list)  # runs lost to others' load
    stopped: str = ""


def payload(size: int, tag: int = 0) -> bytes:
    """An RTP-looking datagram body (first byte 0x80): the relay forwards it as media."""
    body = bytes([0x80]) + struct.pack("!H", tag & 0xFFFF) + os.urandom(max(0, size - 3))
    return body[:size]


def verify_echo(sockets: ClientSockets, frame: Callable[[bytes], bytes]) -> None:
    """Every socket sends one datagram of its own; it must come back byte for byte."""
    probes: list[Exchange] = []
    for i, _ in enumerate(sockets.socks):
        expected = frame(payload(64, i))
        probes.append(Probe(expected, lambda data, e=expected: data == e))
    sockets.converse(probes, timeout=5)


def plain_lane(name: str, path: paths.BenchPath, count: int, size: int) -> Lane:
    """direct / C / relay: raw datagrams; the relay's flows opened by their first packets."""
    sockets = ClientSockets(count, ("127.0.0.1", path.port))
    firsts = (
        read_first_packets(Path(path.first_packets), count) if path.first_packets != "-" else []
    )

    def prepare() -> None:
        if firsts:  # re-sent before each run: an idle flow expires after 30 s
            sockets.converse([Probe(p) for p in firsts], timeout=5)
        verify_echo(sockets, lambda body: body)

    return Lane(name, path.forwarder_pids, sockets, payload(size), prepare)


def read_first_packets(path: Path, count: int) -> list[bytes]:
    """The per-socket first packets bench/paths.py writes (u16 little-endian length + bytes)."""
    data, out, offset = path.read_bytes(), [], 0
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        out.append(data[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return out


def turn_lane(server: Coturn, peer: Addr, count: int, size: int) -> Lane:
    """coturn: one allocation + channel binding to the sink per socket, ChannelData both ways."""
    sockets = ClientSockets(count, ("127.0.0.1", server.port))
    flows = [TurnFlow(server.username, server.password, peer) for _ in range(count)]

    def prepare() -> None:  # allocate once; after that rebind (refreshes the permission too)
        for flow in flows:
            if flow.done:
                flow.refresh()
            else:
                flow.start()
        sockets.converse(list(flows), timeout=10)
        verify_echo(sockets, lambda body: channel_data(FIRST_CHANNEL, body))

    return Lane(
        "coturn", [server.pid], sockets, channel_data(FIRST_CHANNEL, payload(size)), prepare
    )


@dataclass
class Coturn:
    """A running turnserver: where it listens, its user, its pid, its log."""

    port: int
    pid: int
    username: str
    password: str
    log: Path


COTURN_CONFIG = """\
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port={port}
min-port={min_port}
max-port={max_port}
no-tcp
no-tls
no-dtls
no-tcp-relay
allow-loopback-peers
lt-cred-mech
user={user}:{password}
realm=voicerelay.bench
relay-threads=1
no-cli
no-software-attribute
userdb={tmp}/turndb
pidfile={tmp}/turnserver.pid
log-file=stdout
simple-log
"""


def coturn_version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    return "unknown"


@contextlib.contextmanager
def coturn(binary: str, core: int, flows: int) -> Iterator[Coturn]:
    """turnserver in the foreground with its own config, all its threads pinned to `core`."""
    with tempfile.TemporaryDirectory(prefix="vr-coturn-") as tmp:
        port, relay_ports = free_ports(1), max(64, 2 * flows)
        relay_base = free_ports(relay_ports)
        user, password = "bench", os.urandom(8).hex()
        conf, log = Path(tmp) / "turnserver.conf", Path(tmp) / "turnserver.log"
        conf.write_text(
            COTURN_CONFIG.format(
                port=port,
                min_port=relay_base,
                max_port=relay_base + relay_ports - 1,
                user=user,
                password=password,
                tmp=tmp,
            )
        )
        with (
            open(log, "wb") as logf,
            harness.process([binary, "-c", conf], core, stdout=logf, stderr=subprocess.STDOUT) as p,
        ):
            wait_for(lambda: p.poll() is not None or stun_answers(port), 10, 0.05, "coturn")
            if p.poll() is not None:
                raise RuntimeError(f"turnserver exited: {log.read_text()[-1500:]}")
            harness.pin(p.pid, core)  # again: its threads exist now
            yield Coturn(port, p.pid, user, password, log)


def stun_answers(port: int) -> bool:
    """True if a STUN Binding request to 127.0.0.1:port is answered within 0.1 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        tid = os.urandom(12)
        s.sendto(stun.build(stun.BINDING_REQUEST, tid), ("127.0.0.1", port))
        try:
            data = s.recv(2048)
        except OSError:
            return False
    with contextlib.suppress(stun.StunError):
        msg = stun.parse(data)
        return msg.transaction_id == tid and msg.msg_type == stun.BINDING_SUCCESS
    return False


# Runs -----------------------------------------------------------------------------------------
def udp_ports(pids: list[int]) -> set[int]:
    """The local UDP ports these processes hold."""
    ports: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            ports |= {c.laddr.port for c in psutil.Process(pid).net_connections(kind="udp")}
    return ports


def drops_by_side(lane: Lane, sink_port: int) -> dict[str, int]:
    """Datagrams the kernel dropped so far (receive buffer full) at the generator's sockets,
    the forwarder's and the sink's."""
    drops = udp_drops()
    mine = {s.getsockname()[1] for s in lane.sockets.socks}
    return {
        "generator": sum(drops.get(p, 0) for p in mine),
        "forwarder": sum(drops.get(p, 0) for p in udp_ports(lane.forwarder_pids)),
        "sink": drops.get(sink_port, 0),
    }


def run_ns(pids: list[int]) -> int:
    """Nanoseconds every thread of these processes has run so far (/proc/PID/task/*/schedstat:
    nanosecond resolution, where utime + stime count 10 ms ticks)."""
    total = 0
    for pid in pids:
        for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(stat).read_text().split()[0])
    return total


class RunTimeMeter(harness.CpuMeter):
    """`harness.CpuMeter` on schedstat run time (a thread that exits mid-run is not counted:
    the forwarders here keep theirs)."""

    def start(self) -> RunTimeMeter:
        self._ns0, self._wall0 = run_ns(self.pids), time.monotonic()
        return self

    def stop(self) -> RunTimeMeter:
        self.cpu = (run_ns(self.pids) - self._ns0) / 1e9
        self.wall = time.monotonic() - self._wall0
        return self


def wait_quiet(
    cores: tuple[int, ...], own_pids: list[int], timeout: float, limit: float = CONTENDED
) -> float:
    """Wait (at most `timeout` s) until processes not in `own_pids` use under `limit` of one
    core, summed over `cores`, sampled over 0.3 s; returns the seconds waited (the machine is
    shared: a run then starts when others pause)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        mine = RunTimeMeter(own_pids).start()
        meters = [CoreMeter(core).start() for core in cores]
        time.sleep(0.3)
        mine.stop()
        if sum(m.stop().busy for m in meters) - mine.utilisation < limit:
            break
    return time.monotonic() - started


def run_step(lane: Lane, rate: float, args: argparse.Namespace, cores: tuple[int, int]) -> dict:
    """One run of `lane` at `rate` datagrams/s each way: loss and CPU per forwarded packet."""
    lane.prepare()
    waited = wait_quiet(cores, [*lane.forwarder_pids, os.getpid()], args.quiet_wait)
    drops0 = drops_by_side(lane, args.sink_port)
    forwarder = RunTimeMeter(lane.forwarder_pids).start()
    ticks = harness.CpuMeter(lane.forwarder_pids).start()  # the house meter, as a cross-check
    driver_core, test_core = CoreMeter(cores[0]).start(), CoreMeter(cores[1]).start()
    result = lane.sockets.flood(lane.datagram, rate, args.seconds)
    for meter in (forwarder, ticks, driver_core, test_core):
        meter.stop()
    drops = {k: v - drops0[k] for k, v in drops_by_side(lane, args.sink_port).items()}
    sent, received = result["sent"], result["received"]
    forwarded = sent + received
    return {
        **result,
        "path": lane.name,
        "offered_pps": rate,
        "sent_pps": sent / result["send_seconds"],
        "loss": 1 - received / sent if sent else float("nan"),
        "forwarder_cpu_s": forwarder.cpu,
        "forwarder_util": forwarder.utilisation,
        "forwarder_cpu_us_per_packet": (
            forwarder.cpu * 1e6 / forwarded if lane.forwarder_pids and forwarded else float("nan")
        ),
        "forwarder_cpu_us_per_packet_psutil": (
            ticks.cpu * 1e6 / forwarded if lane.forwarder_pids and forwarded else float("nan")
        ),
        "generator_cpu_us_per_packet": result["generator_cpu_s"] * 1e6 / max(1, forwarded),
        "drops": drops,
        "waited_for_quiet_s": waited,
        "driver_core_busy": driver_core.busy,
        "others_on_test_core": max(0.0, test_core.busy - forwarder.utilisation)
        if lane.forwarder_pids
        else test_core.busy,
    }


def contended_loss(step: dict[str, Any], limit: float) -> bool:
    """True if a run lost packets while other processes used the forwarder's core and the
    forwarder was not saturated by itself: worth running again."""
    return (
        step["loss"] > limit
        and step["others_on_test_core"] >= CONTENDED
        and step["forwarder_util"] < SATURATED
    )


def ramp(lanes: list[Lane], args: argparse.Namespace, cores: tuple[int, int]) -> None:
    """Every rate, every lane still in, in turn; a lane leaves after a run over the CPU loss
    limit (it is past its capacity)."""
    active = list(lanes)
    for rate in args.rates:
        for lane in list(active):
            step = run_step(lane, rate, args, cores)
            for _ in range(args.retries):  # others took the forwarder's core: run it again
                if not contended_loss(step, args.loss_limit):
                    break
                print(progress_line(step) + ": contended, run again", flush=True)
                lane.contended.append(step)
                step = run_step(lane, rate, args, cores)
            lane.steps.append(step)
            print(progress_line(step), flush=True)
            if step["loss"] >= args.cpu_loss_limit:
                lane.stopped = f"loss {step['loss']:.3%} at {rate:,.0f}/s"
                active.remove(lane)
        if not active:
            break
    for lane in active:
        lane.stopped = f"carried the highest rate offered ({args.rates[-1]:,.0f}/s)"


def progress_line(step: dict) -> str:
    return (
        f"  {step['path']:>6} {step['offered_pps']:>9,.0f}/s: loss {step['loss']:.3%}, "
        f"forwarder {step['forwarder_cpu_us_per_packet']:.2f} us/pkt "
        f"({step['forwarder_util']:.0%} of its core), generator "
        f"{step['generator_cpu_us_per_packet']:.2f} us/pkt, driver core "
        f"{step['driver_core_busy']:.0%}, others on the test core "
        f"{step['others_on_test_core']:.0%}, drops gen/fwd/sink "
        f"{step['drops']['generator']}/{step['drops']['forwarder']}/{step['drops']['sink']}"
        + (
            f" (waited {step['waited_for_quiet_s']:.1f} s for quiet)"
            if step["waited_for_quiet_s"] > 0.5
            else ""
        )
    )


def max_rate(lane: Lane, limit: float) -> float:
    """Highest rate the lane carried within the loss limit (what it sent, if it fell short)."""
    good = [s for s in lane.steps if s["loss"] <= limit]
    return max((min(s["offered_pps"], s["sent_pps"]) for s in good), default=0.0)


# Output ---------------------------------------------------------------------------------------
def comparison(lanes: dict[str, Lane], limit: float) -> list[dict[str, Any]]:
    """Per offered rate: each forwarder's CPU per packet (runs under `limit` loss), ratios."""
    rows = []
    rates = sorted({s["offered_pps"] for lane in lanes.values() for s in lane.steps})
    for rate in rates:
        row: dict[str, Any] = {"rate": rate}
        for name, lane in lanes.items():
            step = next((s for s in lane.steps if s["offered_pps"] == rate), None)
            ok = step is not None and step["loss"] < limit
            row[name] = step["forwarder_cpu_us_per_packet"] if ok else float("nan")
        relay = row.get("relay", float("nan"))
        row["relay_over_coturn"] = relay / row.get("coturn", float("nan"))
        row["relay_over_c"] = relay / row.get("c", float("nan"))
        rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]], names: list[str], args) -> str:
    forwarders = [n for n in ("c", "relay", "coturn") if n in names]
    headers = ["pkt/s each way", *(f"{n} us/pkt" for n in forwarders)]
    headers += [h for h, n in (("relay/coturn", "coturn"), ("relay/C", "c")) if n in forwarders]
    out = []
    for r in rows:
        line = [r["rate"], *(r[n] for n in forwarders)]
        if "coturn" in forwarders:
            line.append(r["relay_over_coturn"])
        if "c" in forwarders:
            line.append(r["relay_over_c"])
        out.append(line)
    title = (
        f"CPU us per forwarded packet ({args.sockets} flows, {args.payload} B payloads, "
        f"{args.seconds:g} s a run; '-': loss >= {args.cpu_loss_limit:.0%} at that rate)"
    )
    return harness.table(title, headers, out)


def steps_table(lanes: list[Lane]) -> str:
    headers = [
        "path",
        "offered",
        "sent pkt/s",
        "loss %",
        "fwd us/pkt",
        "fwd CPU %",
        "gen us/pkt",
        "driver core %",
        "others test core %",
        "drops gen/fwd/sink",
    ]
    rows = [
        [
            s["path"],
            s["offered_pps"],
            s["sent_pps"],
            100 * s["loss"],
            s["forwarder_cpu_us_per_packet"],
            100 * s["forwarder_util"],
            s["generator_cpu_us_per_packet"],
            100 * s["driver_core_busy"],
            100 * s["others_on_test_core"],
            "/".join(str(s["drops"][k]) for k in ("generator", "forwarder", "sink")),
        ]
        for lane in lanes
        for s in lane.steps
    ]
    return harness.table("Every run (rates each way)", headers, rows)


def max_table(lanes: list[Lane], limit: float) -> str:
    rows = [[lane.name, max_rate(lane, limit), lane.stopped] for lane in lanes]
    title = f"Max packets/s each way with loss <= {limit:.2%}"
    return harness.table(title, ["path", "max pkt/s each way", "ramp stopped by"], rows)


def worst_ratio(rows: list[dict[str, Any]], key: str) -> float | None:
    """The highest ratio over the rates where both forwarders carried the load."""
    ratios = [r[key] for r in rows if r[key] == r[key]]
    return max(ratios) if ratios else None


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for key, label, budget in (
        ("relay_over_coturn", "relay / coturn", 0.9),
        ("relay_over_c", "relay / C", 1.15),
    ):
        ratios = [r[key] for r in rows if r[key] == r[key]]
        if not ratios:
            continue
        met = all(x <= budget for x in ratios)
        lines.append(
            f"{label} per packet: {min(ratios):.2f}-{max(ratios):.2f}x over "
            f"{len(ratios)} rates (budget <= {budget}x at every rate): {'met' if met else 'NOT met'}"
        )
    return lines


# Main -----------------------------------------------------------------------------------------
PATHS = ("direct", "c", "relay", "coturn")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, fewer rates")
    p.add_argument("--seconds", type=float, default=None, help="length of each run [4]")
    p.add_argument(
        "--rates",
        default="10000,20000,40000,80000,100000,120000,140000,170000,200000",
        help="offered rates, packets/s each way, ascending (the last ones search the max)",
    )
    p.add_argument("--sockets", type=int, default=64, help="client sockets (flows)")
    p.add_argument("--payload", type=int, default=160, help="datagram payload bytes")
    p.add_argument(
        "--loss-limit", type=float, default=0.0, help="most loss a run may have for the max [0]"
    )
    p.add_argument(
        "--cpu-loss-limit",
        type=float,
        default=0.01,
        help="CPU per packet is reported for runs under this loss; a path leaves after one over",
    )
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="seconds a run may wait for other processes to leave our cores [15]",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="reruns of a lossy step while other processes used >10%% of the forwarder's core",
    )
    args = p.parse_args()
    if args.quick:
        args.rates = "10000,40000,80000,120000"
    args.seconds = args.seconds or (1.5 if args.quick else 4.0)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.paths = [n for n in args.paths.split(",") if n]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"unknown path(s) {sorted(unknown)}: use {','.join(PATHS)}")
    return args


def main() -> None:
    args = parse_args()
    info = harness.machine()
    binaries = harness.build_c()
    driver, under_test = harness.cores()
    harness.pin(os.getpid(), driver)
    turnserver = shutil.which("turnserver")
    notes: list[str] = []
    if "coturn" in args.paths and turnserver is None:
        notes.append("coturn: skipped (turnserver not installed: run `make bench-setup`)")
        print(notes[-1], flush=True)
    lanes: list[Lane] = []
    with paths.sink(binaries, driver) as sink_port, contextlib.ExitStack() as stack:
        args.sink_port = sink_port
        setups: dict[str, Callable[[], Lane]] = {
            "direct": lambda: plain_lane(
                "direct", stack.enter_context(paths.direct(sink_port)), args.sockets, args.payload
            ),
            "c": lambda: plain_lane(
                "c",
                stack.enter_context(paths.c_forwarder(binaries, sink_port, under_test)),
                args.sockets,
                args.payload,
            ),
            "relay": lambda: plain_lane(
                "relay",
                stack.enter_context(paths.relay(sink_port, under_test, driver, args.sockets)),
                args.sockets,
                args.payload,
            ),
            "coturn": lambda: turn_lane(
                stack.enter_context(coturn(turnserver, under_test, args.sockets)),
                ("127.0.0.1", sink_port),
                args.sockets,
                args.payload,
            ),
        }
        for name in args.paths:
            if name == "coturn" and turnserver is None:
                continue
            lane = setups[name]()
            stack.callback(lane.sockets.close)
            lanes.append(lane)
        print(
            f"forwarders on core {under_test}; generator + sink on core {driver}; paths "
            f"{', '.join(lane.name for lane in lanes)}",
            flush=True,
        )
        ramp(lanes, args, (driver, under_test))
    by_name = {lane.name: lane for lane in lanes}
    forwarders = {n: lane for n, lane in by_name.items() if n != "direct"}
    rows = comparison(forwarders, args.cpu_loss_limit)
    info["loadavg_at_end"] = os.getloadavg()[0]
    figures = {
        "parameters": {**vars(args)},
        "coturn_version": coturn_version(turnserver) if turnserver else None,
        "notes": notes,
        "comparison": rows,
        "max_pps_each_way": {lane.name: max_rate(lane, args.loss_limit) for lane in lanes},
        "stopped": {lane.name: lane.stopped for lane in lanes},
        "steps": {lane.name: lane.steps for lane in lanes},
        "contended_runs_repeated": {lane.name: lane.contended for lane in lanes},
        "worst": {key: worst_ratio(rows, key) for key in ("relay_over_coturn", "relay_over_c")},
        "budgets": {"relay_over_coturn": 0.9, "relay_over_c": 1.15},
    }
    summary = budget_lines(rows) + notes
    summary.append(
        f"load average at start {info['loadavg_at_start']:.2f}, at end "
        f"{info['loadavg_at_end']:.2f} (2 cores: others' load moves the figures)"
    )
    tables = [
        steps_table(lanes),
        comparison_table(rows, list(by_name), args),
        max_table(lanes, args.loss_limit),
        "\n".join(summary),
    ]
    harness.report("peer_coturn", tables, figures, info)


if __name__ == "__main__":
    main()
