"""A relay worker process: two UDP sockets on uvloop and a `RelayRouter`; it only moves bytes.

Each socket is drained in batches with recvmmsg and answered with sendmmsg (`relay.mmsg`),
so a burst of datagrams costs a few system calls rather than two per packet.

The public socket shares the relay port with every other worker (SO_REUSEPORT: the kernel
hashes each client to one worker). The internal socket has a stable per-worker address, so a
transceiver's replies still land after this worker is restarted.

With the kernel fast path on (`relay.fastpath`), the worker also keeps the kernel's entries for
its flows in step with its router on every tick (`KernelSync`).

With a TCP port configured, the worker also listens there (SO_REUSEPORT again) for ICE over TCP
(`relay.tcp.TcpService`): frames go to transceivers through the same router and internal
socket, and the replies the router queues for TCP clients are written out after each batch
from transceivers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import uvloop

from voicerelay.net import bind_udp, family_of
from voicerelay.process import die_with_parent
from voicerelay.relay.config import RelayConfig
from voicerelay.relay.fastpath.kernel import FlowMap
from voicerelay.relay.fastpath.sync import KernelSync
from voicerelay.relay.mmsg import DatagramBatch, Route
from voicerelay.relay.router import RelayRouter
from voicerelay.relay.tcp import TcpService, TcpSettings
from voicerelay.shm.counters import CounterArray
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire.addr import SOCKADDR_IN6_SIZE, SOCKADDR_IN_SIZE, sockaddr
from voicerelay.wire.token import load_keys

log = logging.getLogger("voicerelay.worker")

TICK = 0.1  # flush, expiry and counter publication period (seconds)
BATCH = 64  # datagrams per recvmmsg/sendmmsg
SLOT = 2048  # bytes per datagram slot: above the largest accepted envelope (oversize shows)
MAX_BATCHES = 16  # batches per wake-up before yielding to the loop


class Pump:
    """Moves datagrams from one socket to the other through a router method, in batches.

    On each wake-up: recvmmsg a batch, route every datagram, sendmmsg what is to be sent, call
    `after` (if any: the TCP side writes what the batch routed to its connections); again while
    batches come back full, up to `MAX_BATCHES` (then yields to the loop, so one busy direction
    cannot starve the other or the timer).
    """

    def __init__(
        self,
        source: socket.socket,
        target: socket.socket,
        route: Route,
        on_send_failures: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.fd = source.fileno()
        self.target_fd = target.fileno()
        self.route = route
        self.on_send_failures = on_send_failures
        self.clock = clock
        self.after = after
        self.rx = DatagramBatch(BATCH, SLOT, sockaddr_size(source.family))
        self.tx = DatagramBatch(BATCH, SLOT, sockaddr_size(target.family))

    def on_readable(self) -> None:
        rx, tx, route = self.rx, self.tx, self.route
        for _ in range(MAX_BATCHES):
            try:
                n = rx.recv(self.fd)
            except OSError as exc:  # e.g. a queued ICMP error: nothing to forward
                log.debug("recvmmsg failed: %s", exc)
                return
            if not n:
                return
            m = rx.route_into(n, route, tx, self.clock())
            if m:
                _, failed = tx.send(self.target_fd, m)
                if failed:
                    self.on_send_failures(failed)
            if self.after is not None:
                self.after()
            if n < rx.size:
                return


def sockaddr_size(family: int) -> int:
    return SOCKADDR_IN6_SIZE if family == socket.AF_INET6 else SOCKADDR_IN_SIZE


class Worker:
    """One worker's sockets, router and timer."""

    def __init__(self, config: RelayConfig, index: int, kernel_flows_fd: int | None = None) -> None:
        self.config = config
        self.index = index
        self.table = FlowTable.attach(config.shm_name)
        self.counters = CounterArray.attach(config.counters_name)
        # Everything that can fail first: the public port groups are joined last, so a worker
        # that cannot start never takes a share of the clients' packets with it.
        self.internal_sock = bind_udp(*config.internal_addr(index), reuse_port=False)
        keys = load_keys(config.secret_path)
        now = time.monotonic()
        self.router = RelayRouter(
            keys,
            self.table,
            index,
            cluster_id=config.cluster_id,
            cluster_routes=config.routes,
            hop_limit=config.hop_limit,
            hop_peers=config.hop_peer_networks,
            idle_timeout=config.idle_timeout,
            expire_interval=TICK,
            public_family=family_of(config.listen_host),  # the public socket's, below
            internal_family=self.internal_sock.family,
            token_window=config.token_window,
            token_clients=config.token_clients,
            new_flow_rate=config.new_flow_rate,
            new_flow_burst=config.new_flow_burst,
            rebind_after=config.rebind_after,
            unanswered_timeout=config.unanswered_timeout,
            offload=kernel_flows_fd is not None,
            now=now,
            wall_offset=time.time() - now,
        )
        self.tcp: TcpService | None = None
        if config.tcp_port:
            self.tcp = TcpService(
                self.router,
                self.internal_sock,
                DatagramBatch(BATCH, SLOT, sockaddr_size(self.internal_sock.family)),
                TcpSettings(
                    config.listen_host, config.tcp_port, config.tcp_connections, config.idle_timeout
                ),
            )
        self.kernel: KernelSync | None = None
        if kernel_flows_fd is not None and self.router.offload:
            wildcard = socket.inet_aton(config.listen_host) == bytes(4)
            self.kernel = KernelSync(
                FlowMap(kernel_flows_fd),
                self.router,
                sockaddr(config.internal_addr(index)),
                bytes(4) if wildcard else socket.inet_aton(config.listen_host),
            )
            taken = self.kernel.start(now)
            if taken:
                log.info("worker %d: took up %d flows the kernel forwards", index, taken)
        self.public_sock = bind_udp(config.listen_host, config.listen_port, reuse_port=True)
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        router = self.router
        inbound = Pump(
            self.public_sock,
            self.internal_sock,
            router.client_datagram,
            router.count_send_failures,
            after=self._kernel_ops_now if self.kernel is not None else None,
        )
        outbound = Pump(
            self.internal_sock,
            self.public_sock,
            router.transceiver_datagram,
            router.count_send_failures,
            after=self.tcp.deliver if self.tcp is not None else None,
        )
        if self.tcp is not None:
            await self.tcp.start()
        loop.add_reader(inbound.fd, inbound.on_readable)
        loop.add_reader(outbound.fd, outbound.on_readable)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopped.set)
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self.stopped.wait()
        finally:
            ticker.cancel()
            self._publish(time.monotonic())
            loop.remove_reader(inbound.fd)
            loop.remove_reader(outbound.fd)
            if self.tcp is not None:
                self.tcp.close()
            self.public_sock.close()
            self.internal_sock.close()

    def _kernel_ops_now(self) -> None:
        """After a batch from clients: a flow the batch rebound leaves the kernel's map at
        once, so its media stops going where it went (puts wait for the next tick)."""
        assert self.kernel is not None
        if self.router.kernel_ops:
            self.kernel.apply()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._publish(time.monotonic())

    def _publish(self, now: float) -> None:
        try:
            self.router.wall_offset = time.time() - now  # follows the wall clock's steps
            if self.kernel is not None:
                self.kernel.poll(now)
            self.router.flush(now)
            self.router.expire(now)
            if self.kernel is not None:
                self.kernel.apply()
            values = self.router.counters()
            if self.tcp is not None:
                self.tcp.sweep(now)
                values.update(self.tcp.counters())
            self.counters.publish(self.index, values)
        except Exception:  # never let bookkeeping kill forwarding
            log.exception("worker %d: periodic flush failed", self.index)


def run_worker(config: RelayConfig, index: int, kernel_flows_fd: int | None = None) -> None:
    """Entry point of a forked worker process: serve until SIGTERM. `kernel_flows_fd`: the
    kernel fast path's flow map (inherited from the launcher), or None."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.set_event_loop_policy(None)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        worker = Worker(config, index, kernel_flows_fd)
        loop.run_until_complete(worker.run())
    finally:
        loop.close()
    os._exit(0)
