"""The shared load client of the transceiver benchmarks: many `ClientCall`s on one uvloop loop.

- `bench_stack()` starts a real relay (one worker, pinned by us) and a real transceiver, and
  puts the transceiver alone on the core under test, the relay worker and this process on the
  driver core.
- `LoadClient` opens calls with bounded concurrency (through the relay, or "direct": the call
  wraps its datagrams in the relay envelope and talks to the transceiver's internal port), runs
  one ticker that sends an Opus-sized RTP packet every 20 ms for every secure call (the calls
  spread over 10 phases 2 ms apart, as independent clients would be), and counts what each call
  sent and got echoed; `server_counts()` asks the transceiver what it received/sent.
- `Meters` measure CPU of our processes and of both cores (to expose others sharing them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import harness
import psutil

from tests.support.procs import RelayProcess, TransceiverProcess
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.wire.addr import Addr

TICK = 0.020  # one Opus frame
PHASES = 10  # calls send in 10 groups 2 ms apart, as independent clients would (1: all at once)
PAYLOAD_SIZE = 60  # a typical 20 ms Opus voice frame
RTP_TICKS = 960  # 20 ms at Opus's 48 kHz RTP clock


# The stack under test --------------------------------------------------------------------------
@dataclass
class Stack:
    """A relay and a transceiver, pinned: transceiver on `test_core`, the rest on `driver_core`."""

    relay: RelayProcess
    transceiver: TransceiverProcess
    relay_worker: int
    driver_core: int
    test_core: int

    @property
    def transceiver_pid(self) -> int:
        assert self.transceiver.proc is not None
        return self.transceiver.proc.pid


@contextlib.contextmanager
def bench_stack(consent_timeout: float = 30.0) -> Iterator[Stack]:
    """Start relay (`--workers 1 --no-pin`) + transceiver; always stop both and clean up."""
    driver, test = harness.cores()
    raise_fd_limit()
    harness.pin(os.getpid(), driver)
    with (
        tempfile.TemporaryDirectory(prefix="voicerelay-bench-") as tmp,
        RelayProcess(Path(tmp), workers=1, extra=["--no-pin"]) as relay,
        TransceiverProcess(
            relay,
            consent_timeout=consent_timeout,
            extra=["--session-rate", "0"],  # a load client places calls faster than people
        ) as transceiver,
    ):
        status = relay.status()
        worker = status["workers"][0]["pid"]
        for pid in (relay.launcher_pid(), worker):
            harness.pin(pid, driver)
        assert transceiver.proc is not None
        harness.pin(transceiver.proc.pid, test)
        yield Stack(relay, transceiver, worker, driver, test)


def raise_fd_limit() -> None:
    """One socket per call: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Measuring --------------------------------------------------------------------------------------
class CoreMeter:
    """How busy one core was between `start()` and `stop()`, whoever ran on it.

    Compared with our own processes' CPU it shows load from others sharing the core."""

    def __init__(self, core: int) -> None:
        self.core = core
        self.busy = 0.0

    def _sample(self) -> tuple[float, float]:
        """(busy, elapsed) so far: busy is wall time minus idle (the tick-charged busy fields
        over-count bursty loads on this kernel; idle time is exact: harness.MachineMeter)."""
        t = psutil.cpu_times(percpu=True)[self.core]
        unavailable = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
        now = time.monotonic()
        return now - unavailable, now

    def start(self) -> CoreMeter:
        self._busy0, self._total0 = self._sample()
        return self

    def stop(self) -> CoreMeter:
        busy, total = self._sample()
        elapsed = total - self._total0
        self.busy = (busy - self._busy0) / elapsed if elapsed > 0 else float("nan")
        return self


class Meters:
    """CPU of our three processes and of both cores over one interval."""

    def __init__(self, stack: Stack) -> None:
        self.transceiver = harness.CpuMeter([stack.transceiver_pid])
        self.relay = harness.CpuMeter([stack.relay_worker])
        self.client = harness.CpuMeter([os.getpid()])
        self.trx_core = CoreMeter(stack.test_core)
        self.driver_core = CoreMeter(stack.driver_core)
        self._all = (self.transceiver, self.relay, self.client, self.trx_core, self.driver_core)

    def start(self) -> Meters:
        for meter in self._all:
            meter.start()
        return self

    def stop(self) -> Meters:
        for meter in self._all:
            meter.stop()
        return self

    @property
    def others_on_trx_core(self) -> float:
        """Share of the transceiver's core used by processes not ours."""
        return max(0.0, self.trx_core.busy - self.transceiver.utilisation)

    @property
    def others_on_driver_core(self) -> float:
        """Share of the driver core used by processes other than the relay worker and us."""
        return max(0.0, self.driver_core.busy - self.client.utilisation - self.relay.utilisation)


def udp_drops() -> dict[int, int]:
    """Datagrams dropped by the kernel (receive buffer full) per local 127.0.0.1 UDP port."""
    drops: dict[int, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            ip, port = fields[1].split(":")
            if ip == "0100007F":
                drops[int(port, 16)] = drops.get(int(port, 16), 0) + int(fields[-1])
    return drops


@dataclass
class Drops:
    """Socket-buffer drops by where they happened."""

    transceiver: int = 0
    relay: int = 0
    clients: int = 0

    def __sub__(self, other: Drops) -> Drops:
        return Drops(
            self.transceiver - other.transceiver,
            self.relay - other.relay,
            self.clients - other.clients,
        )


def socket_drops(stack: Stack, calls: list[ClientCall]) -> Drops:
    """Drops now at the transceiver's socket, the relay worker's two sockets, our calls'."""
    drops = udp_drops()
    relay_ports = (stack.relay.port, stack.relay.internal_base)
    client_ports = {c.local_addr[1] for c in calls if c.transport is not None}
    return Drops(
        transceiver=drops.get(stack.transceiver.internal_port, 0),
        relay=sum(drops.get(p, 0) for p in relay_ports),
        clients=sum(drops.get(p, 0) for p in client_ports),
    )


# Counting ---------------------------------------------------------------------------------------
@dataclass
class Counts:
    """RTP packets at a moment: what the clients sent/got back, what the server got/sent."""

    sent: int = 0  # clients -> transceiver
    echoed: int = 0  # transceiver -> clients, arrived
    server_in: int = 0  # arrived at the transceiver (decrypted)
    server_out: int = 0  # echoed by the transceiver

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.sent - other.sent,
            self.echoed - other.echoed,
            self.server_in - other.server_in,
            self.server_out - other.server_out,
        )

    @property
    def loss_up(self) -> float:
        """Fraction lost client -> relay -> transceiver."""
        return loss(self.sent, self.server_in)

    @property
    def loss_down(self) -> float:
        """Fraction lost transceiver -> relay -> client."""
        return loss(self.server_out, self.echoed)

    @property
    def loss_round_trip(self) -> float:
        return loss(self.sent, self.echoed)


def loss(sent: int, arrived: int) -> float:
    """Lost fraction (NaN when nothing was sent); late arrivals never make it negative."""
    return max(0.0, (sent - arrived) / sent) if sent else float("nan")


@dataclass
class SetupResult:
    """How opening a batch of calls went."""

    opened: int = 0
    failed: int = 0
    seconds: float = 0.0
    setup_ms: list[float] = field(default_factory=list)  # offer posted -> DTLS connected
    signaling_ms: list[float] = field(default_factory=list)  # offer posted -> answer back
    ice_ms: list[float] = field(default_factory=list)  # answer back -> ICE connected
    dtls_ms: list[float] = field(default_factory=list)  # ICE connected -> DTLS connected
    errors: list[str] = field(default_factory=list)


def record_setup(result: SetupResult, call: ClientCall) -> None:
    """Add one secure call's setup times (ms) to `result`."""
    assert call.secure_at is not None and call.answered_at is not None
    ice_at = call.ice_connected_at or call.secure_at
    result.opened += 1
    result.setup_ms.append((call.secure_at - call.posted_at) * 1000)
    result.signaling_ms.append((call.answered_at - call.posted_at) * 1000)
    result.ice_ms.append((ice_at - call.answered_at) * 1000)
    result.dtls_ms.append((call.secure_at - ice_at) * 1000)


# The load client --------------------------------------------------------------------------------
class LoadClient:
    """Many calls against one transceiver, one ticker for all of them."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        *,
        direct: Addr | None = None,
        certificate: Certificate | None = None,
        phases: int = PHASES,
    ) -> None:
        self.http = http
        self.url = url
        self.options = CallOptions(direct=direct, keep_packets=False)
        self.certificate = certificate or Certificate.generate()  # one for all: no keygen per call
        self.calls: list[ClientCall] = []
        self.live: list[ClientCall] = []  # secure calls the ticker sends for
        self.payload = os.urandom(PAYLOAD_SIZE)
        self.phases = phases
        self.ticks = 0  # sub-ticks: one per phase
        self.missed_ticks = 0
        self._timestamp = 0
        self._phase = 0
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0

    # Calls ------------------------------------------------------------------------------------
    async def open_calls(
        self, count: int, concurrency: int = 50, timeout: float = 10.0
    ) -> SetupResult:
        """Open `count` calls, at most `concurrency` in setup at once; wait until each is secure."""
        result = SetupResult()
        gate = asyncio.Semaphore(concurrency)
        start = time.monotonic()

        async def one() -> None:
            async with gate:
                await self._open_one(result, timeout)

        await asyncio.gather(*(one() for _ in range(count)))
        result.seconds = time.monotonic() - start
        return result

    def new_call(self) -> ClientCall:
        """One call of this load (subclasses: a call that talks, or answers full ICE)."""
        return ClientCall(self.certificate)

    async def _open_one(self, result: SetupResult, timeout: float) -> None:
        call = self.new_call()
        try:
            await asyncio.wait_for(call.connect(self.http, self.url, self.options), timeout)
            await asyncio.wait_for(call.secure, timeout)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - counted, not fatal
            result.failed += 1
            result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            call.close()
            return
        record_setup(result, call)
        self.calls.append(call)
        self.live.append(call)

    def close_all(self) -> None:
        """Close every call (DTLS close_notify: the transceiver reaps the session)."""
        self.stop_ticker()
        for call in self.calls:
            call.close()
        self.calls.clear()
        self.live.clear()

    # Audio ------------------------------------------------------------------------------------
    def start_ticker(self) -> None:
        """Every 20 ms, one RTP packet for every live call, the calls spread over `phases`
        sub-ticks. A late sub-tick still sends; one more than 20 ms late is skipped and
        counted (a call never sends two packets to catch up)."""
        if self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._next = loop.time()
        self._tick()

    def stop_ticker(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._next <= now + 0.001:  # due by now (timers fire up to 1 ms early)
            if self._next < now - TICK:
                self.missed_ticks += 1
            else:
                self._send_phase()
                self.ticks += 1
            self._next += TICK / self.phases
            self._phase = (self._phase + 1) % self.phases
        self._handle = loop.call_at(self._next, self._tick)

    def _send_phase(self) -> None:
        if self._phase == 0:
            self._timestamp = (self._timestamp + RTP_TICKS) & 0xFFFFFFFF
        payload, timestamp = self.payload, self._timestamp
        for call in self.live[self._phase :: self.phases]:  # a call keeps its phase
            call.send_audio(payload, timestamp)

    # Counting -------------------------------------------------------------------------------
    def client_counts(self) -> Counts:
        """What the clients sent and got back so far."""
        return Counts(
            sent=sum(c.rtp_sent for c in self.calls),
            echoed=sum(c.rtp_received for c in self.calls),
        )

    async def server_counts(self, concurrency: int = 50) -> Counts:
        """Client counts plus the transceiver's own per-session RTP counters (one GET each).

        Take it while no audio flows, so both sides describe the same packets."""
        gate = asyncio.Semaphore(concurrency)

        async def one(call: ClientCall) -> tuple[int, int]:
            assert call.location is not None
            async with gate, self.http.get(call.location) as resp:
                if resp.status != 200:
                    return 0, 0
                stats = await resp.json()
                return stats["rtp_in"], stats["rtp_out"]

        counts = self.client_counts()
        pairs = await asyncio.gather(*(one(c) for c in self.calls))
        counts.server_in = sum(p[0] for p in pairs)
        counts.server_out = sum(p[1] for p in pairs)
        return counts


async def drain(seconds: float = 0.5) -> None:
    """Let packets in flight arrive before counting."""
    await asyncio.sleep(seconds)


async def wait_sessions(stack: Stack, at_most: int, timeout: float = 10.0) -> int:
    """Wait until the transceiver holds at most `at_most` sessions; returns how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = (await asyncio.to_thread(stack.transceiver.stats))["sessions"]
        if sessions <= at_most or time.monotonic() > deadline:
            return sessions
        await asyncio.sleep(0.1)
