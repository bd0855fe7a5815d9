"""A relay worker process: two UDP sockets on uvloop and a `RelayRouter`; it only moves bytes.

The public socket shares the relay port with every other worker (SO_REUSEPORT: the kernel
hashes each client to one worker). The internal socket has a stable per-worker address, so a
transceiver's replies still land after this worker is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import time

import uvloop

from voicerelay.relay.config import RelayConfig
from voicerelay.relay.router import RelayRouter
from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire.token import load_keys

log = logging.getLogger("voicerelay.worker")

TICK = 0.1  # flush, expiry and counter publication period (seconds)
SOCKET_BUFFER = 4 << 20
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (the launcher) dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def bind_udp(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port), with large kernel buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class PublicProtocol(asyncio.DatagramProtocol):
    """Client datagrams in; envelopes out through the internal socket."""

    def __init__(self, router: RelayRouter, clock=time.monotonic) -> None:
        self.router = router
        self.internal: asyncio.DatagramTransport | None = None
        self.clock = clock

    def datagram_received(self, data: bytes, addr) -> None:
        if len(addr) != 2:  # IPv6 sockets report (host, port, flowinfo, scope)
            addr = addr[:2]
        routed = self.router.from_client(data, addr, self.clock())
        if routed is not None and self.internal is not None:
            self.internal.sendto(routed[1], routed[0])

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do
        pass


class InternalProtocol(asyncio.DatagramProtocol):
    """Transceiver envelopes in; client datagrams out through the public socket."""

    def __init__(self, router: RelayRouter, clock=time.monotonic) -> None:
        self.router = router
        self.public: asyncio.DatagramTransport | None = None
        self.clock = clock

    def datagram_received(self, data: bytes, addr) -> None:
        if len(addr) != 2:
            addr = addr[:2]
        routed = self.router.from_transceiver(data, addr, self.clock())
        if routed is not None and self.public is not None:
            self.public.sendto(routed[1], routed[0])

    def error_received(self, exc: Exception) -> None:
        pass


class Worker:
    """One worker's sockets, router and timer."""

    def __init__(self, config: RelayConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.table = FlowTable.attach(config.shm_name)
        self.counters = CounterArray.attach(config.counters_name)
        self.router = RelayRouter(
            load_keys(config.secret_path),
            self.table,
            index,
            cluster_id=config.cluster_id,
            idle_timeout=config.idle_timeout,
            expire_interval=TICK,
        )
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        public_sock = bind_udp(cfg.listen_host, cfg.listen_port, reuse_port=True)
        internal_sock = bind_udp(*cfg.internal_addr(self.index), reuse_port=False)
        public_proto = PublicProtocol(self.router)
        internal_proto = InternalProtocol(self.router)
        public, _ = await loop.create_datagram_endpoint(lambda: public_proto, sock=public_sock)
        internal, _ = await loop.create_datagram_endpoint(
            lambda: internal_proto, sock=internal_sock
        )
        public_proto.internal = internal
        internal_proto.public = public
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopped.set)
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self.stopped.wait()
        finally:
            ticker.cancel()
            self._publish(time.monotonic())
            public.close()
            internal.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._publish(time.monotonic())

    def _publish(self, now: float) -> None:
        try:
            self.router.flush(now)
            self.router.expire(now)
            self.counters.publish(self.index, self.router.counters())
        except Exception:  # never let bookkeeping kill forwarding
            log.exception("worker %d: periodic flush failed", self.index)


def run_worker(config: RelayConfig, index: int) -> None:
    """Entry point of a forked worker process: serve until SIGTERM."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.set_event_loop_policy(None)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        worker = Worker(config, index)
        loop.run_until_complete(worker.run())
    finally:
        loop.close()
    os._exit(0)
