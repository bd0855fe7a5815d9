"""Relay (userspace and kernel fast path) vs coturn vs the C forwarder: CPU per relayed packet
and max packets/s, same datagrams, same rates, same run.

    .venv/bin/python bench/peer_coturn.py [--quick] [--rates 10000,20000,...] [--paths ...]

Paths, all around one C echo (the sink, standing in for a transceiver or a TURN peer):
- `direct`: generator -> sink, no forwarder (the floor of generator and sink);
- `c`: the C recvmmsg/sendmmsg forwarder (bench/c/forwarder.c, set up by bench/paths.py);
- `relay`: voicerelay with one worker (bench/paths.py);
- `coturn`: Debian coturn (`turnserver`, `make bench-setup` installs it) in the foreground with
  a config of its own: UDP only, one relay thread (`-m 1`), loopback peers allowed, a static
  long-term user. Each generator socket holds an allocation (Allocate, 401, Allocate with
  MESSAGE-INTEGRITY) and a channel binding to the sink; datagrams travel as ChannelData (4-byte
  header) both ways. Missing coturn is skipped with one line;
- `relay-kernel`: voicerelay with `--kernel-fast-path` (bench/paths.py), the same first packets
  as `relay`; before each run every generator flow must be in the kernel (`kernel_flows`), or
  the run fails. Its relay runs only during its own runs (started before, stopped after): its
  tc program on `lo` would otherwise run for every loopback datagram of the other paths.

One load generator drives every path: this process with 64 connected client sockets, the
datagram prebuilt in C memory, sent with sendmmsg (8 a socket, round robin) every 2 ms and
drained with recvmmsg (`voicerelay.relay.mmsg`), so Python does no per-packet work. The payload
is 160 bytes on every path (coturn's client datagrams carry 4 more bytes of ChannelData header,
the relay's envelopes to the sink 22 more). Forwarder on the core under test; generator and sink
on the other. At each offered rate every path runs once in turn (the other forwarders stay up,
idle between runs), so a ratio compares runs seconds apart on the same machine. A forwarded
packet is one datagram moved one way (a round trip through a forwarder is two).

Two CPU figures per forwarded packet:
- the forwarder's processes (schedstat run time): what a userspace forwarder costs. It cannot
  see the kernel path, whose tc program runs in softirq on the CPU of whoever sent the datagram
  (on loopback: the generator's and the sink's), in no forwarder process;
- the extra machine CPU over `direct` at the same rate, the same way for every path: (busy time
  of every core during the run - during the direct run) / packets forwarded, busy = wall time
  - idle - iowait - steal from /proc/stat (psutil.cpu_times). Everything the path adds counts
  wherever it ran; so does anything else that ran, which is why a run where the machine was
  busy >= 5 % of a core beyond our processes' run time (quiet: 1-2 %) is run again
  (`--retries`) and marked. Two cross-checks: the same difference over the run time of our
  own processes and the softirq threads (schedstat; blind to others, and to the idle loop's
  cost of each wake-up), and over the tick-sampled busy fields (user + nice + system + irq +
  softirq, as loadclient.CoreMeter), which over-count short bursts (harness.MachineMeter).

CPU per packet is shown for runs under 1 % loss (`--cpu-loss-limit`); a path leaves the ramp
after a run over that; its max is the highest rate it carried with no loss at all
(`--loss-limit`). A lossy run while other processes used the forwarder's core is run again, and
every run first waits a while for others to leave our cores (`--quiet-wait`): the machine may be
shared.

Budgets (issue 14): relay CPU per packet <= 0.9x coturn's and <= 1.15x the C forwarder at every
rate from 10k packets/s each way; with the fast path, CPU per forwarded packet <= 0.3x the C
forwarder's (extra machine CPU over direct).
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
DISTURBED = 0.05  # cores the machine ran beyond ours (quiet: ~0.01-0.02) that void a run's
# machine busy time: over 4 s at 10k packets/s each way, 0.05 of a core is 2.8 us a packet
SATURATED = 0.95  # a forwarder this busy lost packets by itself
KERNEL_SHARE_EXPECTED = 0.999  # of the kernel path's datagrams its tc program should forward


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

    def addresses(self) -> list[tuple[str, int]]:
        """The sockets' own addresses (the flows' client addresses)."""
        return [s.getsockname() for s in self.socks]

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
    """One path under load: whose CPU counts, the generator's sockets and datagram for it, how
    to (re)open its flows before a run and what to do after it; the relay paths' `path`
    (their relay, to read where it forwarded)."""

    name: str
    forwarder_pids: list[int]
    sockets: ClientSockets
    datagram: bytes
    prepare: Callable[[], None]
    finish: Callable[[], None] = lambda: None
    path: paths.BenchPath | None = None
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

    def prepare() -> None:
        if path.first_packets != "-":  # re-sent before each run: an idle flow expires after 30 s
            paths.refresh_first_packets(path)  # a token opens a flow for 30 s after its issue
            firsts = paths.read_first_packets(Path(path.first_packets), count)
            sockets.converse([Probe(p) for p in firsts], timeout=5)
        verify_echo(sockets, lambda body: body)

    relay = path if path.relay is not None else None
    return Lane(name, path.forwarder_pids, sockets, payload(size), prepare, path=relay)


def kernel_lane(path: paths.BenchPath, count: int, size: int, cores: tuple[int, int]) -> Lane:
    """relay-kernel: the relay lane's flows, every one of them offloaded to the kernel before
    a run (RuntimeError otherwise). The relay runs only for its own runs, (re)started before
    and stopped after each: its tc program on `lo` would otherwise run for every loopback
    datagram of the other paths too."""
    lane = plain_lane(path.name, path, count, size)
    open_flows = lane.prepare
    driver, under_test = cores

    def prepare() -> None:
        if not paths.relay_running(path):
            paths.start_relay(path, under_test, driver)
        try:
            open_flows()
        except RuntimeError as exc:
            raise RuntimeError(f"{path.name}: {exc}; {paths.relay_diagnosis(path)}") from None
        paths.wait_offloaded(path, lane.sockets.addresses())

    lane.prepare = prepare
    lane.finish = lambda: paths.stop_relay(path)
    paths.stop_relay(path)  # until its first run
    return lane


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


def softirq_threads() -> list[int]:
    """The pids of the softirq threads (ksoftirqd/N): loopback datagram work they take over is
    the load's, not another process's."""
    return [
        p.pid
        for p in psutil.process_iter(["name"])
        if (p.info["name"] or "").startswith("ksoftirqd/")
    ]


def run_step(lane: Lane, rate: float, args: argparse.Namespace, cores: tuple[int, int]) -> dict:
    """One run of `lane` at `rate` datagrams/s each way (its flows opened before, its `finish`
    after): loss, CPU per forwarded packet, and the machine's busy time."""
    lane.prepare()
    try:
        return measure(lane, rate, args, cores)
    finally:
        lane.finish()


def measure(lane: Lane, rate: float, args: argparse.Namespace, cores: tuple[int, int]) -> dict:
    """The run itself: wait for quiet, offer the load, read every meter. On the kernel path
    the kernel also times its tc program (`paths.bpf_run_time`) during the run."""
    relay = lane.path
    with contextlib.ExitStack() as stack:
        timed = relay is not None and relay.kernel and stack.enter_context(paths.bpf_run_time())
        return measure_run(lane, rate, args, cores, timed)


def measure_run(
    lane: Lane, rate: float, args: argparse.Namespace, cores: tuple[int, int], timed: bool
) -> dict:
    waited = wait_quiet(cores, [*lane.forwarder_pids, os.getpid()], args.quiet_wait)
    relay = lane.path
    if relay is not None and relay.kernel:  # still every flow in the kernel after the wait
        paths.wait_offloaded(relay, lane.sockets.addresses())
    tc0 = paths.tc_program_run(relay) if timed and relay is not None else None
    filters = paths.lo_tc_filters()
    counts0 = paths.relay_counts(relay) if relay is not None else None
    launcher = paths.relay_launcher_pid(relay) if relay is not None else None
    own = [os.getpid(), args.sink_pid, *lane.forwarder_pids, *args.softirq_pids]
    own += [launcher] if launcher else []
    drops0 = drops_by_side(lane, args.sink_port)
    machine = harness.MachineMeter().start()
    others = harness.OthersMeter(own).start()
    ours = RunTimeMeter(own).start()
    relay_processes = RunTimeMeter([*lane.forwarder_pids, *([launcher] if launcher else [])])
    relay_processes.start()
    forwarder = RunTimeMeter(lane.forwarder_pids).start()
    ticks = harness.CpuMeter(lane.forwarder_pids).start()  # the house meter, as a cross-check
    driver_core, test_core = CoreMeter(cores[0]).start(), CoreMeter(cores[1]).start()
    result = lane.sockets.flood(lane.datagram, rate, args.seconds)
    for meter in (forwarder, ticks, driver_core, test_core, relay_processes, ours, others, machine):
        meter.stop()
    drops = {k: v - drops0[k] for k, v in drops_by_side(lane, args.sink_port).items()}
    sent, received = result["sent"], result["received"]
    forwarded = sent + received
    where = paths.counts_since(counts0, paths.relay_counts(relay)) if counts0 else None
    tc1 = paths.tc_program_run(relay) if tc0 is not None and relay is not None else None
    tc_ns, tc_runs = (tc1[0] - tc0[0], tc1[1] - tc0[1]) if tc0 and tc1 else (None, None)
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
        "machine_busy_s": machine.busy,
        "machine_busy_ticks_s": machine.busy_ticks,
        "machine_wall_s": machine.wall,
        "machine_cpu_us_per_packet": machine.busy * 1e6 / max(1, forwarded),
        "ours_cpu_s": ours.cpu,
        "others_cores": max(0.0, machine.busy - ours.cpu) / machine.wall,
        "others_processes_cores": others.cores,
        "forwarded_where": where,
        "relay_processes_cpu_s": relay_processes.cpu if relay is not None else None,
        "tc_program_ns": tc_ns,  # its run time while timed (every run on lo ingress counts)
        "tc_program_runs": tc_runs,
        "kernel_share": kernel_share(where),
        "lo_tc_filters": filters,
        "foreign_tc_programs": len(filters) - (1 if relay is not None and relay.kernel else 0),
        "drops": drops,
        "waited_for_quiet_s": waited,
        "driver_core_busy": driver_core.busy,
        "others_on_test_core": max(0.0, test_core.busy - forwarder.utilisation)
        if lane.forwarder_pids
        else test_core.busy,
    }


def kernel_share(where: dict[str, int] | None) -> float:
    """The share of a relay's datagrams its tc program forwarded (NaN for other paths)."""
    if not where:
        return float("nan")
    total = where["kernel"] + where["userspace"]
    return where["kernel"] / total if total else float("nan")


def contended_loss(step: dict[str, Any], limit: float) -> bool:
    """True if a run lost packets while other processes used the forwarder's core and the
    forwarder was not saturated by itself: worth running again."""
    return (
        step["loss"] > limit
        and step["others_on_test_core"] >= CONTENDED
        and step["forwarder_util"] < SATURATED
    )


def disturbed(step: dict[str, Any]) -> bool:
    """True if the machine was busy >= DISTURBED of a core more than our processes and the
    softirq threads ran during the run: other processes (`others_processes_cores`: those
    still alive at the end), ones that came and went, the idle loop's own overhead (about 1 %
    of a core in these runs): the run's machine busy time is then not all the path's."""
    return step["others_cores"] >= DISTURBED


def ramp(lanes: list[Lane], args: argparse.Namespace, cores: tuple[int, int]) -> None:
    """Every rate, every lane still in, in turn; a lane leaves after a run over the CPU loss
    limit (it is past its capacity). A run others disturbed is run again (`--retries`)."""
    active = list(lanes)
    for rate in args.rates:
        for lane in list(active):
            step = run_step(lane, rate, args, cores)
            for _ in range(args.retries):  # others took our cores: run it again
                if contended_loss(step, args.loss_limit):
                    why = "contended"
                elif disturbed(step):
                    why = f"others took {step['others_cores']:.0%} of a core"
                else:
                    break
                print(f"{progress_line(step)}: {why}, run again", flush=True)
                lane.contended.append(step)
                step = run_step(lane, rate, args, cores)
            lane.steps.append(step)
            print(progress_line(step), flush=True)
            if step["kernel_share"] < KERNEL_SHARE_EXPECTED and lane.path and lane.path.kernel:
                print(
                    f"  {lane.name}: the kernel forwarded only {step['kernel_share']:.2%}: "
                    f"{step['forwarded_where']}",
                    flush=True,
                )
            if step["loss"] >= args.cpu_loss_limit:
                lane.stopped = f"loss {step['loss']:.3%} at {rate:,.0f}/s"
                active.remove(lane)
        if not active:
            break
    for lane in active:
        lane.stopped = f"carried the highest rate offered ({args.rates[-1]:,.0f}/s)"


def progress_line(step: dict) -> str:
    share = step["kernel_share"]
    return (
        f"  {step['path']:>12} {step['offered_pps']:>9,.0f}/s: loss {step['loss']:.3%}, "
        f"forwarder {step['forwarder_cpu_us_per_packet']:.2f} us/pkt "
        f"({step['forwarder_util']:.0%} of its core), machine "
        f"{step['machine_cpu_us_per_packet']:.2f} us/pkt, generator "
        f"{step['generator_cpu_us_per_packet']:.2f} us/pkt, driver core "
        f"{step['driver_core_busy']:.0%}, others on the test core "
        f"{step['others_on_test_core']:.0%}, on the machine {step['others_cores']:.0%}, "
        f"drops gen/fwd/sink "
        f"{step['drops']['generator']}/{step['drops']['forwarder']}/{step['drops']['sink']}"
        + (f", in kernel {share:.2%}" if share == share else "")
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
FORWARDERS = ("c", "relay", "coturn", paths.KERNEL)
RATIOS = (  # (key, numerator, denominator): of the per-process figures and of each EXTRA
    ("relay_over_coturn", "relay", "coturn"),
    ("relay_over_c", "relay", "c"),
    ("relay_kernel_over_c", paths.KERNEL, "c"),
)
BUDGETS = {
    "relay_over_coturn": 0.9,
    "relay_over_c": 1.15,
    "relay_kernel_over_c_machine": 0.3,
}


def step_at(lane: Lane | None, rate: float) -> dict[str, Any] | None:
    if lane is None:
        return None
    return next((s for s in lane.steps if s["offered_pps"] == rate), None)


EXTRA = {  # suffix of the extra-CPU figures -> the step's CPU seconds they come from
    "_machine": "machine_busy_s",  # every core, wall - idle (the figure the budget uses)
    "_machine_ticks": "machine_busy_ticks_s",  # every core, the tick-sampled busy fields
    "_ours": "ours_cpu_s",  # run time of every process of the run and the softirq threads
}


def extra_cpu(
    step: dict[str, Any] | None, direct: dict[str, Any] | None, limit: float, key: str
) -> float:
    """CPU us per forwarded packet over the direct run at the same rate: (`key` CPU seconds in
    this run - in the direct run) / packets forwarded in this run. NaN unless both runs
    stayed under `limit` loss."""
    if step is None or direct is None or step["loss"] >= limit or direct["loss"] >= limit:
        return float("nan")
    forwarded = step["sent"] + step["received"]
    return (step[key] - direct[key]) * 1e6 / forwarded if forwarded else float("nan")


def comparison(lanes: dict[str, Lane], limit: float) -> list[dict[str, Any]]:
    """Per offered rate: each forwarder's CPU per packet (its processes; runs under `limit`
    loss), its extra CPU per packet over direct (`<name><suffix>`, EXTRA), and the ratios."""
    rows = []
    rates = sorted({s["offered_pps"] for lane in lanes.values() for s in lane.steps})
    for rate in rates:
        row: dict[str, Any] = {"rate": rate}
        direct = step_at(lanes.get("direct"), rate)
        ok = direct is not None and direct["loss"] < limit
        row["direct_machine_total"] = direct["machine_cpu_us_per_packet"] if ok else float("nan")
        row["direct_ours_total"] = (
            direct["ours_cpu_s"] * 1e6 / (direct["sent"] + direct["received"])
            if ok
            else float("nan")
        )
        disturbed_runs = [
            n for n, lane in lanes.items() if (s := step_at(lane, rate)) and disturbed(s)
        ]
        row["disturbed"] = disturbed_runs
        for name, lane in lanes.items():
            if name == "direct":
                continue
            step = step_at(lane, rate)
            ok = step is not None and step["loss"] < limit
            row[name] = step["forwarder_cpu_us_per_packet"] if ok else float("nan")
            for suffix, key in EXTRA.items():
                row[name + suffix] = extra_cpu(step, direct, limit, key)
        for key, top, bottom in RATIOS:
            for suffix in ("", *EXTRA):
                row[key + suffix] = ratio(row.get(top + suffix), row.get(bottom + suffix))
        row.update(at_source(step_at(lanes.get(paths.KERNEL), rate), limit))
        row["relay_kernel_over_c_source"] = ratio(row[f"{paths.KERNEL}_source"], row.get("c"))
        rows.append(row)
    return rows


def at_source(step: dict[str, Any] | None, limit: float) -> dict[str, float]:
    """The kernel path's cost measured where it is spent, per forwarded packet: its tc
    program's run time (the kernel's BPF run-time stats) and its relay's processes (worker and
    launcher: offloading, counters, renewals), and their sum. NaN where not measured."""
    nan = float("nan")
    tc = processes = nan
    if step is not None and step["loss"] < limit:
        forwarded = step["sent"] + step["received"]
        if step.get("tc_program_ns") is not None and forwarded:
            tc = step["tc_program_ns"] / 1e3 / forwarded
        if step.get("relay_processes_cpu_s") is not None and forwarded:
            processes = step["relay_processes_cpu_s"] * 1e6 / forwarded
    return {
        f"{paths.KERNEL}_tc": tc,
        f"{paths.KERNEL}_processes": processes,
        f"{paths.KERNEL}_source": tc + processes,
    }


def source_table(rows: list[dict[str, Any]]) -> str:
    """The kernel path at the source against the C forwarder's process."""
    k = paths.KERNEL
    headers = [
        "pkt/s each way",
        "tc program us/pkt",
        "relay processes us/pkt",
        "sum",
        "C forwarder us/pkt",
        "sum / C",
    ]
    out = [
        [
            r["rate"],
            r[f"{k}_tc"],
            r[f"{k}_processes"],
            r[f"{k}_source"],
            r.get("c", float("nan")),
            r["relay_kernel_over_c_source"],
        ]
        for r in rows
    ]
    title = (
        f"{k} measured where its cost is spent, per forwarded packet: its tc program's run time "
        "(the kernel's BPF run-time stats, on while it runs: two clock reads a program run "
        "included) and its relay's processes (schedstat), against the C forwarder's process"
    )
    return harness.table(title, headers, out)


def ratio(top: float | None, bottom: float | None) -> float:
    """top / bottom, NaN if either is missing (or NaN) or bottom is not positive."""
    if top is None or bottom is None or top != top or bottom != bottom or bottom <= 0:
        return float("nan")
    return top / bottom


def comparison_table(rows: list[dict[str, Any]], names: list[str], args) -> str:
    forwarders = [n for n in FORWARDERS if n in names]
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
        f"CPU us per forwarded packet of the forwarder's processes ({args.sockets} flows, "
        f"{args.payload} B payloads, {args.seconds:g} s a run; '-': loss >= "
        f"{args.cpu_loss_limit:.0%} at that rate; {paths.KERNEL}: its worker, which forwards "
        "nothing once the kernel has the flows)"
    )
    return harness.table(title, headers, out)


EXTRA_TITLES = {
    "_machine": (
        "Extra machine CPU us per forwarded packet over direct at the same rate: (busy time of "
        "every core in the run - in the direct run) / packets forwarded; busy = wall - idle - "
        "iowait - steal, every core (/proc/stat). 'direct total': the direct run's own busy "
        "time per packet (generator + sink + the kernel's loopback work)"
    ),
    "_ours": (
        "Cross-check, blind to other processes: the same difference over the run time "
        "(schedstat, ns) of every process of the run (generator, sink, forwarder, relay "
        "launcher) and the softirq threads; softirq work done in a process's context counts in "
        "its run time"
    ),
}


def machine_table(rows: list[dict[str, Any]], names: list[str], suffix: str) -> str:
    """Extra CPU per forwarded packet over direct (`suffix` of EXTRA), every forwarder, and the
    ratios."""
    forwarders = [n for n in FORWARDERS if n in names]
    headers = ["pkt/s each way", "direct total", *forwarders]
    shown = [(key, top, bottom) for key, top, bottom in RATIOS if {top, bottom} <= set(names)]
    headers += [f"{top}/{'C' if bottom == 'c' else bottom}" for _, top, bottom in shown]
    if suffix == "_machine":
        headers.append(f"others >= {DISTURBED:.0%} of a core in")
    out = [
        [
            r["rate"],
            flag(r["direct_machine_total"], "direct" in r["disturbed"])
            if suffix == "_machine"
            else r["direct_ours_total"],
            *(flag(r[n + suffix], tainted(r, {n}, suffix)) for n in forwarders),
            *(flag(r[k + suffix], tainted(r, {top, bot}, suffix)) for k, top, bot in shown),
            *([",".join(r["disturbed"]) or "-"] if suffix == "_machine" else []),
        ]
        for r in rows
    ]
    note = " ('*': a run disturbed, not judged)" if suffix == "_machine" else ""
    return harness.table(EXTRA_TITLES[suffix] + note, headers, out)


def flag(value: float, flagged: bool) -> float | str:
    """A table cell: the value, with '*' if `flagged` (a NaN stays '-')."""
    if not flagged or value != value:
        return value
    return f"{value:,.3f}*" if abs(value) < 10 else f"{value:,.1f}*"


def steps_table(lanes: list[Lane]) -> str:
    headers = [
        "path",
        "offered",
        "sent pkt/s",
        "loss %",
        "fwd us/pkt",
        "fwd CPU %",
        "machine us/pkt",
        "gen us/pkt",
        "driver core %",
        "others test core %",
        "others machine %",
        "in kernel %",
        "lo bpf",
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
            s["machine_cpu_us_per_packet"],
            s["generator_cpu_us_per_packet"],
            100 * s["driver_core_busy"],
            100 * s["others_on_test_core"],
            100 * s["others_cores"],
            100 * s["kernel_share"],
            len(s["lo_tc_filters"]),
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


def ratio_parts(key: str) -> tuple[str, str, str]:
    """(numerator, denominator, EXTRA suffix or '') of a ratio key of `comparison`."""
    if key == "relay_kernel_over_c_source":
        return paths.KERNEL, "c", "_source"
    for base, top, bottom in RATIOS:
        for suffix in ("", *EXTRA):
            if key == base + suffix:
                return top, bottom, suffix
    raise KeyError(key)


def tainted(row: dict[str, Any], names: set[str], suffix: str) -> bool:
    """True if a machine-wide figure of `names` at this rate came from a disturbed run (theirs
    or the direct run it is measured against)."""
    return suffix.startswith("_machine") and bool((names | {"direct"}) & set(row["disturbed"]))


def judged(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(the ratios under `key` to judge, the rates left out because a run was disturbed):
    rates where both forwarders carried the load, and for a machine-wide ratio, where neither
    their runs nor the direct run were disturbed."""
    top, bottom, suffix = ratio_parts(key)
    kept, left_out = [], []
    for row in rows:
        if row[key] != row[key]:
            continue
        if tainted(row, {top, bottom}, suffix):
            left_out.append(row["rate"])
        else:
            kept.append(row[key])
    return kept, left_out


def worst_ratio(rows: list[dict[str, Any]], key: str) -> float | None:
    """The highest ratio over the rates `judged` keeps."""
    ratios, _ = judged(rows, key)
    return max(ratios) if ratios else None


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for key, label, budget in (
        ("relay_over_coturn", "relay / coturn per packet (processes)", 0.9),
        ("relay_over_c", "relay / C per packet (processes)", 1.15),
        ("relay_over_coturn_machine", "relay / coturn extra machine CPU", 0.9),
        ("relay_over_c_machine", "relay / C extra machine CPU", 1.15),
        ("relay_kernel_over_c_machine", f"{paths.KERNEL} / C extra machine CPU", 0.3),
    ):
        ratios, left_out = judged(rows, key)
        out = (
            f" ({', '.join(f'{r / 1000:g}k' for r in left_out)} left out: a run disturbed)"
            if left_out
            else ""
        )
        if not ratios:
            if left_out:
                lines.append(f"{label}: not judged{out}")
            continue
        met = all(x <= budget for x in ratios)
        lines.append(
            f"{label}: {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rates "
            f"(budget <= {budget}x at every rate): {'met' if met else 'NOT met'}{out}"
        )
    for suffix, how in (
        ("_source", "at the source (tc program + relay processes) over C's process"),
        ("_ours", "run time of our processes"),
        ("_machine_ticks", "busy as the tick-sampled busy fields (biased, see harness)"),
    ):
        check, _ = judged(rows, "relay_kernel_over_c" + suffix)
        if check:
            lines.append(
                f"  cross-check, {how}: {paths.KERNEL} / C {min(check):.2f}-{max(check):.2f}x"
            )
    return lines


def kernel_lines(lanes: list[Lane]) -> list[str]:
    """What the kernel path's runs forwarded where, and any other tc program seen on `lo`."""
    lines = []
    for lane in lanes:
        if lane.path is not None and lane.path.kernel and lane.steps:
            shares = [s["kernel_share"] for s in lane.steps]
            lines.append(
                f"{lane.name}: the tc program forwarded {min(shares):.3%}-{max(shares):.3%} of "
                f"the relay's datagrams in every run (the rest: its worker)"
            )
    foreign = [s["foreign_tc_programs"] for lane in lanes for s in lane.steps]
    if any(foreign):
        lines.append(
            f"{sum(1 for n in foreign if n)} of {len(foreign)} runs had up to {max(foreign)} "
            "tc programs of other relays on lo (others' tests: each runs for every loopback "
            "datagram, on every path)"
        )
    return lines


# Main -----------------------------------------------------------------------------------------
PATHS = ("direct", "c", "relay", "coturn", paths.KERNEL)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, fewer rates")
    p.add_argument("--seconds", type=float, default=None, help="length of each run [4]")
    p.add_argument(
        "--rates",
        default=None,
        help="offered rates, packets/s each way, ascending (the last ones search the max) "
        "[10000,20000,40000,80000,100000,120000,140000,170000,200000; --quick: "
        "10000,40000,80000,120000]",
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
        default=None,
        help="seconds a run may wait for other processes to leave our cores [15; --quick: 5]",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="reruns of a step others disturbed: lossy while they used >10%% of the "
        "forwarder's core, or the machine busy >5%% of a core beyond our processes "
        "[2; --quick: 1]",
    )
    args = p.parse_args()
    if args.rates is None:
        args.rates = (
            "10000,40000,80000,120000"
            if args.quick
            else "10000,20000,40000,80000,100000,120000,140000,170000,200000"
        )
    args.seconds = args.seconds or (1.5 if args.quick else 4.0)
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 15.0
    if args.retries is None:
        args.retries = 1 if args.quick else 2
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
    args.softirq_pids = softirq_threads()
    with (
        paths.sink_process(binaries, driver) as (sink_port, sink_pid),
        contextlib.ExitStack() as stack,
    ):
        args.sink_port, args.sink_pid = sink_port, sink_pid
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
            paths.KERNEL: lambda: kernel_lane(
                stack.enter_context(
                    paths.relay(sink_port, under_test, driver, args.sockets, kernel=True)
                ),
                args.sockets,
                args.payload,
                (driver, under_test),
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
    rows = comparison(by_name, args.cpu_loss_limit)
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
        "worst": {
            **{
                key + suffix: worst_ratio(rows, key + suffix)
                for key, _, _ in RATIOS
                for suffix in ("", *EXTRA)
            },
            "relay_kernel_over_c_source": worst_ratio(rows, "relay_kernel_over_c_source"),
        },
        "budgets": BUDGETS,
    }
    summary = budget_lines(rows) + kernel_lines(lanes) + notes
    summary.append(
        f"load average at start {info['loadavg_at_start']:.2f}, at end "
        f"{info['loadavg_at_end']:.2f} (2 cores: others' load moves the figures)"
    )
    tables = [
        steps_table(lanes),
        comparison_table(rows, list(by_name), args),
        machine_table(rows, list(by_name), "_machine"),
        machine_table(rows, list(by_name), "_ours"),
        *([source_table(rows)] if paths.KERNEL in by_name else []),
        max_table(lanes, args.loss_limit),
        "\n".join(summary),
    ]
    harness.report("peer_coturn", tables, figures, info)


if __name__ == "__main__":
    main()
