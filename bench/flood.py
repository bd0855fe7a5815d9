"""Floods at rising rates: do honest calls hold, and what does junk cost the relay?

Honest calls run and new ones are placed while the relay takes junk, spoofed-source token
flows, expired tokens and forged-token STUN, and signaling takes POST floods; the relay's CPU
per junk datagram is set against a forwarded one's.

    .venv/bin/python bench/flood.py [--quick] [--rates 1000,5000,20000,50000,100000]

A real relay (`relayctl start`, 2 workers, default admission options) and a real transceiver
(authentication on, as beyond loopback; default limits) carry `--calls` honest calls (the
project's client-role calls on the load client's ticker, 50 RTP packets/s each way, echoed;
each placed as a browser would: a client token minted with the API key, the offer from an
address of its own). Then, one at a time and each for `--seconds`:

- `baseline`: honest traffic only: the relay's CPU per forwarded packet, and the CPU and
  counter rates every later step subtracts to get what the attack added;
- `forwarded`: the C load generator's known flows (through the relay to a C echo) at the same
  datagram rate as an attack: the rate-matched cost of a forwarded datagram;
- `junk`: random datagrams (random length and first byte) from 1,024 sources, each in its own
  /24 of 127.0.0.0/8 (all local on Linux: real distinct source addresses, no raw sockets);
- `token flows`: Binding requests carrying a real routing token (the ufrag of the answer to a
  real POST, with its real ICE password) from the same 1,024 sources;
- `expired token`: the same with a genuine token issued an hour ago (one captured long ago);
- `forged STUN`: Binding requests with forged token-shaped ufrags (right length and key id:
  each costs the relay one AES-GCM open);
- `POST flood`: anonymous offers at signaling from 256 addresses (the rate limit is per IPv4
  address) or from one address; then again against a transceiver with authentication off
  (the loopback default), where anonymous offers place calls.

Datagram attacks come from a sender process with 64-datagram sendmmsg batches (the attacker is
not the bottleneck: its rate and CPU are reported), POSTs from an asyncio client over
keep-alive connections. During every step `--newcomers` new honest calls are placed the same
way; each must connect (ICE, DTLS) and get audio echoed within CONNECT_TIMEOUT. An attack
step *holds* when the running calls lose nothing and every new call connects.

Relay CPU is its workers' (schedstat, to the nanosecond); "us/dgram" is what the step added
over the baseline divided by the datagrams it added at the relay (its counters: forwarded plus
dropped by reason), so the honest traffic is not counted as junk. Cores: relay workers alone
on one core; the rest (transceiver, clients, attackers) on the other, except in POST floods,
where the transceiver (the target) takes the relay's core. bench/README.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import harness
import paths
import psutil
import uvloop
from loadclient import LoadClient, raise_fd_limit, udp_drops

from tests.support.procs import RelayProcess, TransceiverProcess
from voicerelay.relay.mmsg import DatagramBatch
from voicerelay.relay.router import DROP_REASONS
from voicerelay.transceiver import sdp
from voicerelay.transceiver.certificate import Certificate
from voicerelay.transceiver.client import CallOptions, ClientCall
from voicerelay.wire import stun
from voicerelay.wire.addr import sockaddr
from voicerelay.wire.token import load_keys

WORKERS = 2
API_KEY = "flood-bench-" + "k" * 24
RATES = "1000,5000,20000,50000,100000"
POST_RATES = "250,1000,4000"
SOURCES = 1024  # attacker sockets, each on its own /24 of 127/8
POST_SOURCES = 256  # addresses of the many-address POST flood
POST_ONE_CONNECTIONS = 8  # keep-alive connections of the one-address POST flood
BATCH = 64  # datagrams per sendmmsg
POOL = 16  # distinct batches of attack datagrams (16 x 64 datagrams)
SENDER_TICK = 0.002  # s between the sender's rounds
TOKEN_RAW = 42  # raw bytes of an IPv4 routing token
CONNECT_TIMEOUT = 5.0  # s for a new honest call to connect and echo
SETTLE = 0.4  # s after a step before counting (the relay publishes every 0.1 s)
FWD_SOCKETS = 64  # C load generator flows in `forwarded` steps
FWD_PAYLOAD = 160
REBIND_AFTER = 10.0  # s: the relay's default --rebind-after
FIRM_SHARE = 0.25  # a step's us/dgram is printed when the attack is this share of relay CPU
# Relay drop reasons of datagrams at the public port (the return_* ones concern envelopes from
# transceivers; envelope_* count at both sockets, as an upstream relay's hop envelopes arrive at
# the public port: random junk starting with 'V' lands there).
CLIENT_DROPS = tuple(
    f"drop_{r}" for r in DROP_REASONS if not r.startswith("return_") and r != "send_failed"
)
DATAGRAM_ATTACKS = ("junk", "token flows", "expired token", "forged STUN")
EXPIRED_AGE = 3600.0  # s: the "captured" token of the expired-token flood was issued this long ago


# Addresses ----------------------------------------------------------------------------------
def attack_source(i: int) -> str:
    """Datagram attacker `i`: 127.16.0.1 upwards, each in a /24 of its own."""
    return f"127.{16 + i // 256}.{i % 256}.1"


def post_source(many: bool, i: int) -> str:
    """POST attacker address `i` of the many-address or the one-address flood (the signaling
    rate limit keys on the whole IPv4 address)."""
    return f"127.{32 if many else 48}.{i // 250}.{1 + i % 250}"


def caller_source(i: int) -> str:
    """The HTTP source of honest call `i` (running or new): a person of their own."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


# The attacker processes ---------------------------------------------------------------------
def attack_datagram(kind: str, ufrag: str, pwd: str, key_id: int, rng: random.Random) -> bytes:
    """One attack datagram of `kind` (a fresh transaction id, ufrag or body each time)."""
    if kind == "junk":
        return rng.randbytes(rng.randrange(20, 201))
    if kind == "forged STUN":
        raw = bytes([key_id]) + rng.randbytes(TOKEN_RAW - 1)
        ufrag, pwd = base64.b64encode(raw).rstrip(b"=").decode(), "forged-password"
    return stun.build(
        stun.BINDING_REQUEST,
        rng.randbytes(12),
        [(stun.ATTR_USERNAME, f"{ufrag}:atk{rng.randrange(1 << 20)}".encode())],
        integrity_key=pwd.encode(),
    )


def datagram_sender(spec: dict[str, Any]) -> dict[str, Any]:
    """Send `rate` datagrams/s of `kind` for `seconds` from SOURCES sockets in sendmmsg batches
    (after printing "ready" and reading a line); returns what went out."""
    rng = random.Random(spec["seed"])
    peer = sockaddr(("127.0.0.1", spec["port"]), socket.AF_INET)
    pool = []
    for _ in range(POOL):
        batch = DatagramBatch(BATCH, 256, len(peer))
        for i in range(BATCH):
            data = attack_datagram(spec["kind"], spec["ufrag"], spec["pwd"], spec["key_id"], rng)
            batch.put(i, data, peer)
        pool.append(batch)
    socks = []
    for i in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((attack_source(i), 0))
        socks.append(sock)
    fds = [s.fileno() for s in socks]
    print("ready", flush=True)
    sys.stdin.readline()
    return pace_batches(pool, fds, spec["rate"], spec["seconds"])


def pace_batches(
    pool: list[DatagramBatch], fds: list[int], rate: float, seconds: float
) -> dict[str, Any]:
    """Keep the datagrams sent at `rate` x elapsed time, a batch from each socket in turn."""
    cpu0, start = time.process_time(), time.monotonic()
    end, offered, sent, failed, turn = start + seconds, 0, 0, 0, 0
    while (now := time.monotonic()) < end:
        todo = int(rate * (now - start)) - offered
        while todo > 0:
            n = min(todo, BATCH)
            ok, bad = pool[turn % POOL].send(fds[turn % len(fds)], n)
            sent += ok
            failed += bad
            offered += n
            todo -= n
            turn += 1
        time.sleep(max(0.0, SENDER_TICK - (time.monotonic() - now)))
    elapsed = time.monotonic() - start
    return {
        "sent": sent,
        "failed": failed,
        "active_seconds": elapsed,
        "achieved_per_s": sent / elapsed,
        "cpu_util": (time.process_time() - cpu0) / elapsed,
    }


def post_request(port: int) -> bytes:
    """An anonymous WHIP offer, as bytes on the wire (HTTP/1.1, keep-alive)."""
    offer = sdp.build_offer(
        ice_ufrag="atk1",
        ice_pwd="attackerpassword0123456789",
        fingerprint=Certificate.generate().fingerprint,
        ssrc=1,
        cname="attacker",
    ).encode()
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(offer)}\r\n\r\n"
    )
    return head.encode() + offer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server closes the connection) of one HTTP/1.1 response; the body is skipped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    await reader.readexactly(length)
    return status, "connection: close" in head


async def post_connection(
    spec: dict[str, Any], source: str, interval: float, first: float, statuses: Counter[str]
) -> None:
    """One attacker connection: an offer every `interval` s (one outstanding) until the end."""
    loop = asyncio.get_running_loop()
    request, end, due = spec["request"], spec["end"], first
    reader = writer = None
    while (now := loop.time()) < end:
        await asyncio.sleep(max(0.0, due - now))
        due = max(due + interval, loop.time() - interval)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", spec["port"], local_addr=(source, 0)
                )
            writer.write(request)
            status, close = await asyncio.wait_for(read_response(reader), end + 5 - loop.time())
            statuses[str(status)] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            statuses["error"] += 1
            close = True
        if close and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def post_flood(spec: dict[str, Any]) -> dict[str, Any]:
    """Offers at `rate`/s for `seconds` from `sources` addresses (`per_source` connections each)."""
    spec["request"] = post_request(spec["port"])
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    loop = asyncio.get_running_loop()
    statuses: Counter[str] = Counter()
    many = spec["sources"] > 1
    sources = [post_source(many, i) for i in range(spec["sources"])] * spec["per_source"]
    interval = len(sources) / spec["rate"]
    cpu0, start = time.process_time(), loop.time()
    spec["end"] = start + spec["seconds"]
    await asyncio.gather(
        *(
            post_connection(spec, src, interval, start + interval * i / len(sources), statuses)
            for i, src in enumerate(sources)
        )
    )
    elapsed = loop.time() - start
    answered = sum(v for k, v in statuses.items() if k != "error")
    return {
        "statuses": dict(statuses),
        "sent": answered,
        "active_seconds": elapsed,
        "achieved_per_s": answered / elapsed,
        "cpu_util": (time.process_time() - cpu0) / elapsed,
    }


def attacker_main(spec_json: str) -> None:
    """Entry point of an attacker process: one JSON line out."""
    raise_fd_limit()
    spec = json.loads(spec_json)
    result = uvloop.run(post_flood(spec)) if spec["kind"] == "POST" else datagram_sender(spec)
    print(json.dumps(result), flush=True)


class Attacker:
    """An attacker process, started and made ready before a step; `run` starts its flood."""

    def __init__(self, spec: dict[str, Any], core: int) -> None:
        self.spec, self.core = spec, core
        self.proc: asyncio.subprocess.Process | None = None

    async def ready(self) -> None:
        cmd = [sys.executable, __file__, "--attacker", json.dumps(self.spec)]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        harness.pin(self.proc.pid, self.core)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"attacker did not start: {line!r}")

    async def run(self) -> dict[str, Any]:
        """Start the flood and wait for its figures."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        out, _ = await asyncio.wait_for(self.proc.communicate(), self.spec["seconds"] + 30)
        return json.loads(out.decode().strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


# CPU --------------------------------------------------------------------------------------------
def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds these processes' threads have run (/proc/<pid>/task/*/schedstat): exact,
    where psutil's CPU times count whole 10 ms clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy so far, all cores, steal included (time
    the hypervisor gave to other guests)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def own_cpu(attack: dict[str, Any]) -> float:
    """CPU seconds an attack's process reported (the C generator: per packet)."""
    if "cpu_util" in attack:
        return attack["cpu_util"] * attack["active_seconds"]
    packets = attack.get("sent", 0) + attack.get("received", 0)
    return attack.get("generator_cpu_us_per_packet", 0.0) * packets / 1e6


class CpuMeter:
    """CPU seconds (exact) and wall seconds between `start()` and `stop()`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu = self.wall = 0.0

    def start(self) -> CpuMeter:
        self._cpu0, self._wall0 = cpu_ns(self.pids), time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.cpu = (cpu_ns(self.pids) - self._cpu0) / 1e9
        self.wall = time.monotonic() - self._wall0
        return self


# The stack ------------------------------------------------------------------------------------
@dataclass
class Stack:
    """Relay, transceiver, C echo, and who runs where."""

    relay: RelayProcess
    transceiver: TransceiverProcess
    workers: list[int]
    driver: int
    test: int
    sink_port: int
    first_packets: Path
    binaries: dict[str, Path]
    api_key: str | None
    helpers: list[int]  # this process, the relay's launcher, the C echo

    @property
    def trx_pid(self) -> int:
        assert self.transceiver.proc is not None
        return self.transceiver.proc.pid

    def place_transceiver(self, core: int) -> None:
        """Pin the transceiver to `core` (the relay's during POST floods)."""
        harness.pin(self.trx_pid, core)

    def headers(self) -> dict[str, str]:
        """The app backend's credentials (none with authentication off)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def relay_totals(stack: Stack) -> dict[str, int]:
    """The relay's counters summed over its workers (the control socket, as `relayctl stats`)."""
    return (await asyncio.to_thread(stack.relay.stats))["totals"]


async def trx_stats(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    """The transceiver's /v1/stats (with the API key when authentication is on)."""
    async with http.get(stack.transceiver.url + "/v1/stats", headers=stack.headers()) as r:
        return await r.json()


async def mint_token(http: aiohttp.ClientSession, stack: Stack) -> str:
    """A client token, as an app's backend mints one for its browser."""
    url = stack.transceiver.url + "/v1/client_tokens"
    async with http.post(url, headers=stack.headers()) as resp:
        if resp.status != 200:
            raise RuntimeError(f"minting a client token: {resp.status} {await resp.text()}")
        return (await resp.json())["value"]


async def real_route(http: aiohttp.ClientSession, stack: Stack) -> tuple[str, str]:
    """(server ufrag, server ICE password) of a real call the attacker places and abandons."""
    headers = {"Content-Type": "application/sdp"}
    if stack.api_key:
        headers["Authorization"] = f"Bearer {await mint_token(http, stack)}"
    offer = post_request(stack.transceiver.http_port).split(b"\r\n\r\n", 1)[1]
    url = stack.transceiver.url + "/v1/sessions"
    async with http.post(url, data=offer, headers=headers) as resp:
        if resp.status != 201:
            raise RuntimeError(f"attacker's POST: {resp.status} {await resp.text()}")
        answer = sdp.parse_answer(await resp.text())
    return answer.ice_ufrag, answer.ice_pwd


# Honest calls -------------------------------------------------------------------------------
@dataclass
class Newcomers:
    """New honest calls placed during one step."""

    ok: int = 0
    placed: int = 0
    setup_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def place_call(run: Run, index: int) -> ClientCall:
    """Honest call `index`, as a browser places it: a client token from the app's backend
    (with authentication on), the offer from an address of its own; returns it secure."""
    stack = run.stack
    token = await mint_token(run.api, stack) if stack.api_key else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(local_addr=(caller_source(index), 0))
    call = ClientCall(run.load.certificate)
    try:
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
            await call.connect(http, stack.transceiver.url, CallOptions(keep_packets=False))
        await call.secure
    except BaseException:
        call.close()
        raise
    return call


async def place_newcomer(run: Run, index: int) -> float:
    """A new honest call: connected and echoing. Returns ms from asking for its token to its
    first echoed packet; raises on failure. Hung up after."""
    started = time.monotonic()
    call = await place_call(run, index)
    try:
        while call.rtp_received == 0:
            call.send_audio(b"\x00" * 60, 960)
            await asyncio.sleep(0.02)
        return (time.monotonic() - started) * 1000
    finally:
        call.close()


async def newcomers(run: Run, count: int, seconds: float) -> Newcomers:
    """`count` new calls spread over `seconds`, each from an address not used before."""
    result = Newcomers()
    first = run.placed
    run.placed += count

    async def one(i: int) -> None:
        await asyncio.sleep(seconds * (i + 0.5) / count)
        result.placed += 1
        try:
            ms = await asyncio.wait_for(place_newcomer(run, first + i), CONNECT_TIMEOUT)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - counted
            result.errors.append(f"{type(exc).__name__}: {exc}"[:160])
            return
        result.ok += 1
        result.setup_ms.append(ms)

    await asyncio.gather(*(one(i) for i in range(count)))
    return result


# Steps ----------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One step's figures before interpretation."""

    wall: float
    relay_cpu: float
    trx_cpu: float
    totals: dict[str, int]  # relay counter deltas
    sent: int  # honest RTP out
    echoed: int
    kernel_drops: dict[str, int]
    newcomers: Newcomers
    attack: dict[str, Any]
    others_cpu: float  # CPU seconds of processes not in this benchmark (both cores)


@dataclass
class Run:
    """What every step needs: the stack, the honest load client, an API session."""

    stack: Stack
    load: LoadClient
    api: aiohttp.ClientSession
    args: argparse.Namespace
    placed: int = 0  # honest calls placed so far (each from an address of its own)
    baseline: Measured | None = None  # honest traffic, no attack


def kernel_drops(stack: Stack, load: LoadClient) -> dict[str, int]:
    """Datagrams the kernel dropped (full receive buffer) at relay, transceiver, our calls."""
    drops = udp_drops()
    clients = {c.local_addr[1] for c in load.calls if c.transport is not None}
    return {
        "relay": drops.get(stack.relay.port, 0)
        + sum(drops.get(stack.relay.internal_base + i, 0) for i in range(WORKERS)),
        "transceiver": drops.get(stack.transceiver.internal_port, 0),
        "clients": sum(drops.get(p, 0) for p in clients),
    }


async def measure_step(run: Run, attack: Callable[[], Awaitable[dict[str, Any]]]) -> Measured:
    """Honest traffic plus `attack` (awaited), newcomers placed meanwhile; counted after the
    relay has published and the honest packets in flight arrived."""
    stack, load = run.stack, run.load
    totals0, drops0 = await relay_totals(stack), kernel_drops(stack, load)
    counts0 = load.client_counts()
    relay = CpuMeter(stack.workers).start()
    trx = CpuMeter([stack.trx_pid]).start()
    bench = CpuMeter(stack.helpers).start()
    busy0 = machine_busy()
    load.start_ticker()
    arrivals = asyncio.ensure_future(newcomers(run, run.args.newcomers, run.args.seconds))
    figures = await attack()
    joined = await arrivals
    load.stop_ticker()
    await asyncio.sleep(SETTLE)
    relay.stop()
    trx.stop()
    bench.stop()
    ours = relay.cpu + trx.cpu + bench.cpu + own_cpu(figures)
    totals1, drops1, counts1 = (
        await relay_totals(stack),
        kernel_drops(stack, load),
        load.client_counts(),
    )
    return Measured(
        wall=relay.wall,
        relay_cpu=relay.cpu,
        trx_cpu=trx.cpu,
        totals={k: totals1[k] - totals0[k] for k in totals1},
        sent=counts1.sent - counts0.sent,
        echoed=counts1.echoed - counts0.echoed,
        kernel_drops={k: drops1[k] - drops0[k] for k in drops1},
        newcomers=joined,
        attack=figures,
        others_cpu=max(0.0, machine_busy() - busy0 - ours),
    )


def client_inputs(totals: dict[str, int]) -> int:
    """Datagrams from clients the relay handled: forwarded or dropped by a client-side reason."""
    return totals["packets_in"] + sum(totals[k] for k in CLIENT_DROPS)


def forwarded(totals: dict[str, int]) -> int:
    """Datagrams the relay forwarded, both ways."""
    return totals["packets_in"] + totals["packets_out"]


def added(step: Measured, base: Measured, value: Callable[[Measured], float]) -> float:
    """What a step added to `value` over the baseline's rate for as long as the step."""
    return value(step) - value(base) / base.wall * step.wall


def top_drops(totals: dict[str, int], limit: int = 3) -> str:
    """The largest client-side drop counters, as "reason count, ..."."""
    named = sorted(((totals[k], k) for k in CLIENT_DROPS if totals[k] > 0), reverse=True)
    text = ", ".join(f"{k.removeprefix('drop_')} {v:,}" for v, k in named[:limit])
    return text or "-"


def summarize(name: str, rate: float, step: Measured, base: Measured, unit: str) -> dict[str, Any]:
    """A step's row: holds?, honest loss, newcomers, the relay's drops and marginal CPU."""
    extra_in = added(step, base, lambda m: client_inputs(m.totals))
    extra_fwd = added(step, base, lambda m: forwarded(m.totals))
    extra_cpu = added(step, base, lambda m: m.relay_cpu)
    loss = max(0.0, (step.sent - step.echoed) / step.sent) if step.sent else float("nan")
    new = step.newcomers
    denominator = extra_fwd if unit == "forwarded" else extra_in
    active = step.attack.get("active_seconds", step.wall)
    return {
        "attack": name,
        "rate": rate,
        "achieved_per_s": step.attack.get("achieved_per_s", 0.0),
        "relay_took_per_s": denominator / active,
        "holds": step.sent > 0 and step.echoed >= step.sent and new.ok == new.placed,
        "honest_sent": step.sent,
        "honest_loss": loss,
        "newcomers_ok": new.ok,
        "newcomers": new.placed,
        "newcomer_max_ms": max(new.setup_ms, default=float("nan")),
        "newcomer_errors": new.errors,
        "relay_cpu_s": step.relay_cpu,
        "relay_us_per_datagram": extra_cpu * 1e6 / denominator if denominator > 0 else float("nan"),
        "relay_util": step.relay_cpu / step.wall,
        "attack_cpu_share": extra_cpu / step.relay_cpu if step.relay_cpu else float("nan"),
        "trx_cpu_s": step.trx_cpu,
        "others_util": step.others_cpu / step.wall,
        "kernel_drops": step.kernel_drops,
        "drops": {k: v for k, v in step.totals.items() if k.startswith("drop_") and v},
        "events": {
            k: step.totals[k] for k in ("flows_created", "shard_searches") if step.totals[k]
        },
        "top_drops": top_drops(step.totals),
        "attacker": step.attack,
    }


# The steps' attacks ---------------------------------------------------------------------------
async def no_attack(seconds: float) -> dict[str, Any]:
    """The baseline's attack: none, for as long as a step."""
    await asyncio.sleep(seconds)
    return {}


def loadgen_flood(run: Run, rate: float) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Known flows through the relay to the C echo: `rate` datagrams/s at the relay, half each
    way. Tried twice: a generator socket may be given the port of a call that just ended,
    whose flow the relay rightly refuses to move to the echo for `--rebind-after`."""
    stack = run.stack
    path = paths.BenchPath("relay", stack.relay.port, stack.workers, str(stack.first_packets))

    def once() -> dict[str, Any]:
        # Fresh tokens each time: a token opens flows for a few addresses, within its window.
        target = ("127.0.0.1", stack.sink_port)
        paths.write_first_packets(stack.first_packets, stack.relay.secret_file, target, FWD_SOCKETS)
        return paths.flood(
            stack.binaries,
            path,
            stack.driver,
            rate=rate / 2,
            seconds=run.args.seconds,
            sockets=FWD_SOCKETS,
            payload=FWD_PAYLOAD,
        )

    async def go() -> dict[str, Any]:
        before = await relay_totals(stack)
        try:
            result = await asyncio.to_thread(once)
        except RuntimeError as exc:
            after = await relay_totals(stack)
            why = {k: after[k] - before[k] for k in CLIENT_DROPS if after[k] != before[k]}
            print(f"  forwarded {rate:,.0f}/s: {exc}; relay drops {why}: once more", flush=True)
            result = await asyncio.to_thread(once)
            result["retried"] = {"error": str(exc), "relay_drops": why}
        # The generator's own seconds include half a second of draining after the flood.
        result["achieved_per_s"] = (result["sent"] + result["received"]) / run.args.seconds
        result["active_seconds"] = run.args.seconds
        return result

    return go


async def datagram_attack(run: Run, kind: str, rate: float) -> Attacker:
    """A ready sender of `kind` at `rate` datagrams/s (a real POST first for token flows)."""
    stack = run.stack
    keys = load_keys(stack.relay.secret_file)
    ufrag = pwd = ""
    if kind == "token flows":
        ufrag, pwd = await real_route(run.api, stack)
    elif kind == "expired token":  # a genuine token captured long ago: sealed with the secret
        transceiver = stack.transceiver.internal
        ufrag, pwd = keys.seal(0, transceiver, time.time() - EXPIRED_AGE), "captured-long-ago"
    spec = {
        "kind": kind,
        "port": stack.relay.port,
        "rate": rate,
        "seconds": run.args.seconds,
        "ufrag": ufrag,
        "pwd": pwd,
        "key_id": keys.current,
        "seed": int(rate),
    }
    attacker = Attacker(spec, stack.driver)
    await attacker.ready()
    return attacker


async def post_attack(run: Run, many: bool, rate: float) -> Attacker:
    """A ready POST flooder: POST_SOURCES addresses, or one with a few connections."""
    spec = {
        "kind": "POST",
        "port": run.stack.transceiver.http_port,
        "rate": rate,
        "seconds": run.args.seconds,
        "sources": POST_SOURCES if many else 1,
        "per_source": 1 if many else POST_ONE_CONNECTIONS,
    }
    attacker = Attacker(spec, run.stack.driver)
    await attacker.ready()
    return attacker


@contextlib.asynccontextmanager
async def attacking(make: Awaitable[Attacker]) -> AsyncIterator[Attacker]:
    """The attacker `make` readies, killed after the block if still running."""
    attacker = await make
    try:
        yield attacker
    finally:
        attacker.kill()


# Phases -----------------------------------------------------------------------------------------
async def open_running(run: Run, count: int) -> None:
    """Place `count` calls one after another and hand them to the load client's ticker."""
    for _ in range(count):
        call = await asyncio.wait_for(place_call(run, run.placed), CONNECT_TIMEOUT)
        run.placed += 1
        run.load.calls.append(call)
        run.load.live.append(call)


@contextlib.asynccontextmanager
async def honest_calls(stack: Stack, args: argparse.Namespace) -> AsyncIterator[Run]:
    """`args.calls` running calls (the load client's ticker sends for them), then the
    baseline step."""
    async with aiohttp.ClientSession() as api:
        load = LoadClient(api, stack.transceiver.url)
        run = Run(stack, load, api, args)
        try:
            await open_running(run, args.calls)
            run.baseline = await measure_step(run, lambda: no_attack(args.seconds))
            yield run
        finally:
            load.close_all()


async def datagram_steps(run: Run, rates: list[float]) -> list[dict[str, Any]]:
    """The forwarded reference at each rate, then each datagram attack at each rate."""
    base = run.baseline
    assert base is not None
    rows = []
    run.stack.place_transceiver(run.stack.driver)
    for rate in rates:
        step = await measure_step(run, loadgen_flood(run, rate))
        rows.append(summarize("forwarded", rate, step, base, "forwarded"))
        progress(rows[-1])
    await let_flows_settle("the generator's")
    for kind in DATAGRAM_ATTACKS:
        for rate in rates:
            async with attacking(datagram_attack(run, kind, rate)) as attacker:
                step = await measure_step(run, attacker.run)
            rows.append(summarize(kind, rate, step, base, "client"))
            progress(rows[-1])
    return rows


async def let_flows_settle(whose: str) -> None:
    """Wait until flows to another transceiver (`whose`) no longer count as established. A new
    honest call's socket may be given the port of one of theirs that just closed (all of them
    live on 127.0.0.1), and the relay rightly refuses to move an established flow to another
    transceiver for `--rebind-after` (counted: rebind_refused)."""
    print(f"  (waiting {REBIND_AFTER + 1:g} s: {whose} flows stop counting as established)")
    await asyncio.sleep(REBIND_AFTER + 1)


async def post_steps(run: Run, label: str, rates: list[float]) -> list[dict[str, Any]]:
    """POST floods from many addresses, then from one, rising; a variant that fails stops
    rising (its sessions are let go first)."""
    base = run.baseline
    assert base is not None
    rows = []
    run.stack.place_transceiver(run.stack.test)
    for many in (True, False):
        name = f"POST {label}, {'256 addresses' if many else '1 address'}"
        for rate in rates:
            async with attacking(post_attack(run, many, rate)) as attacker:
                step = await measure_step(run, attacker.run)
            row = summarize(name, rate, step, base, "client")
            statuses = step.attack.get("statuses", {})
            row["statuses"] = statuses
            answered = sum(v for k, v in statuses.items() if k != "error")
            row["trx_us_per_post"] = added(step, base, lambda m: m.trx_cpu) * 1e6 / max(1, answered)
            row["trx_util"] = step.trx_cpu / step.wall
            row["sessions_after"] = (await trx_stats(run.api, run.stack))["sessions"]
            rows.append(row)
            progress(row)
            await let_sessions_go(run)
            if not row["holds"]:
                break
    return rows


async def let_sessions_go(run: Run) -> None:
    """Wait (up to the connect timeout and a bit) until abandoned offers have been closed."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (await trx_stats(run.api, run.stack))["sessions"] <= run.args.calls + 4:
            return
        await asyncio.sleep(0.25)


def progress(row: dict[str, Any]) -> None:
    """One line as each step ends."""
    new = f"{row['newcomers_ok']}/{row['newcomers']}"
    if "statuses" in row:
        cost = f"trx {row['trx_us_per_post']:.0f} us/POST; {row['statuses']}"
    else:
        cost = f"relay {row['relay_us_per_datagram']:.2f} us/dgram; {row['top_drops']}"
    print(
        f"  {row['attack']:>30} {row['rate']:>8,.0f}/s: sent {row['achieved_per_s']:>8,.0f}/s "
        f"holds {'yes' if row['holds'] else 'NO '} loss {row['honest_loss']:.4f} new {new} "
        f"{cost}",
        flush=True,
    )


async def phase(
    stack: Stack, args: argparse.Namespace, body: Callable[[Run], Awaitable[list[dict[str, Any]]]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Honest calls, the baseline, then `body`'s steps; returns (baseline row, rows)."""
    async with honest_calls(stack, args) as run:
        assert run.baseline is not None
        base = summarize("baseline", 0, run.baseline, run.baseline, "forwarded")
        fwd = forwarded(run.baseline.totals)
        base["relay_us_per_forwarded"] = run.baseline.relay_cpu * 1e6 / max(1, fwd)
        base["forwarded_per_s"] = fwd / run.baseline.wall
        return base, await body(run)


# Setup --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def relay_and_sink(
    tmp: Path, binaries: dict[str, Path], driver: int, test: int
) -> Iterator[tuple[RelayProcess, list[int], int, Path]]:
    """The relay (workers pinned to `test`) and the C echo; yields (relay, worker pids, echo
    port, first-packets file of the load generator)."""
    with (
        RelayProcess(tmp, workers=WORKERS, extra=["--no-pin"]) as relay,
        paths.sink(binaries, driver) as sink_port,
    ):
        status = relay.status()
        workers = [w["pid"] for w in status["workers"]]
        harness.pin(relay.launcher_pid(), driver)
        for pid in workers:
            harness.pin(pid, test)
        first = tmp / "first-packets"
        paths.write_first_packets(first, relay.secret_file, ("127.0.0.1", sink_port), FWD_SOCKETS)
        yield relay, workers, sink_port, first


def children(name: str) -> list[int]:
    """Pids of this process's children running program `name`."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, IndexError):
            if Path(child.cmdline()[0]).name == name:
                found.append(child.pid)
    return found


def transceiver(relay: RelayProcess, auth: bool) -> TransceiverProcess:
    """A transceiver with default limits; authentication on (API key) or off."""
    return TransceiverProcess(relay, extra=["--require-auth", "--api-key", API_KEY] if auth else [])


def run_phases(args: argparse.Namespace) -> dict[str, Any]:
    """Relay and echo for the whole run; a transceiver with authentication on (datagram and
    POST floods), then one with it off (POST floods)."""
    binaries = harness.build_c()
    driver, test = harness.cores()
    harness.pin(os.getpid(), driver)
    raise_fd_limit()
    rates = [float(r) for r in args.rates.split(",")]
    post_rates = [float(r) for r in args.post_rates.split(",")]
    out: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="vr-bench-flood-") as tmp,
        relay_and_sink(Path(tmp), binaries, driver, test) as (relay, workers, sink_port, first),
    ):

        def stack(trx: TransceiverProcess, key: str | None) -> Stack:
            helpers = [os.getpid(), relay.launcher_pid(), *children("sink")]
            built = Stack(
                relay, trx, workers, driver, test, sink_port, first, binaries, key, helpers
            )
            built.place_transceiver(driver)
            return built

        async def auth_on(run: Run) -> list[dict[str, Any]]:
            return await datagram_steps(run, rates) + await post_steps(run, "auth on", post_rates)

        async def auth_off(run: Run) -> list[dict[str, Any]]:
            return await post_steps(run, "auth off", post_rates)

        async def after_settling(trx: Stack) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            await let_flows_settle("the first transceiver's calls'")
            return await phase(trx, args, auth_off)

        with transceiver(relay, auth=True) as trx:
            print("auth on: baseline, datagram floods, POST floods", flush=True)
            out["baseline"], out["steps"] = uvloop.run(phase(stack(trx, API_KEY), args, auth_on))
        with transceiver(relay, auth=False) as trx:
            print("auth off (the loopback default): POST floods", flush=True)
            out["baseline_auth_off"], more = uvloop.run(after_settling(stack(trx, None)))
            out["steps"] += more
        out["relay_stats_at_end"] = relay.stats()["totals"]
    return out


# Report -------------------------------------------------------------------------------------------
def fwd_reference(steps: list[dict[str, Any]]) -> dict[float, float]:
    """Relay us per forwarded datagram by rate (the `forwarded` rows)."""
    return {s["rate"]: s["relay_us_per_datagram"] for s in steps if s["attack"] == "forwarded"}


def datagram_table(out: dict[str, Any]) -> str:
    honest = out["baseline"]["relay_us_per_forwarded"]
    ref = fwd_reference(out["steps"])
    rows = []
    for s in out["steps"]:
        if s["attack"].startswith("POST"):
            continue
        firm = s["attack_cpu_share"] >= FIRM_SHARE
        us = s["relay_us_per_datagram"] if firm else float("nan")
        rows.append(
            [
                s["attack"],
                s["rate"],
                s["achieved_per_s"],
                "yes" if s["holds"] else "NO",
                s["honest_loss"],
                f"{s['newcomers_ok']}/{s['newcomers']}",
                s["newcomer_max_ms"],
                us,
                s["attack_cpu_share"] * 100,
                us / ref[s["rate"]] if s["attack"] != "forwarded" else 1.0,
                us / honest,
                s["kernel_drops"]["relay"],
                s["others_util"] * 100,
                s["top_drops"],
            ]
        )
    headers = [
        "attack",
        "rate/s",
        "sent/s",
        "holds",
        "honest loss",
        "new ok",
        "new max ms",
        "relay us/dgram",
        "attack %",
        "x fwd@rate",
        "x honest fwd",
        "kernel drops",
        "others %",
        "relay drops (top 3)",
    ]
    base = out["baseline"]
    title = (
        f"datagram floods. Honest calls alone: {base['forwarded_per_s']:,.0f} forwarded/s, "
        f"relay {honest:.2f} us per forwarded packet (x honest). x fwd@rate: against known "
        f"flows at the same datagram rate (the forwarded rows); attack %: the step's share of "
        f"relay CPU (us/dgram shown from {FIRM_SHARE:.0%}: below, the honest traffic's own "
        "variation swamps it); kernel drops: at the relay's sockets; "
        "others %: CPU of processes outside this benchmark (a core = 100)"
    )
    return harness.table(title, headers, rows)


def post_table(out: dict[str, Any]) -> str:
    rows = []
    for s in out["steps"]:
        if not s["attack"].startswith("POST"):
            continue
        st = s["statuses"]
        rows.append(
            [
                s["attack"],
                s["rate"],
                s["achieved_per_s"],
                "yes" if s["holds"] else "NO",
                s["honest_loss"],
                f"{s['newcomers_ok']}/{s['newcomers']}",
                s["newcomer_max_ms"],
                " ".join(f"{k}:{v}" for k, v in sorted(st.items())),
                s["trx_us_per_post"],
                s["trx_util"] * 100,
                s["sessions_after"],
                s["others_util"] * 100,
            ]
        )
    headers = [
        "attack",
        "rate/s",
        "answered/s",
        "holds",
        "honest loss",
        "new ok",
        "new max ms",
        "statuses",
        "trx us/POST",
        "trx cpu %",
        "sessions",
        "others %",
    ]
    return harness.table("signaling POST floods (transceiver on its own core)", headers, rows)


def held(out: dict[str, Any]) -> dict[str, float]:
    """Per attack: the highest rate held with every lower rate held too (0: none)."""
    best: dict[str, float] = {}
    failed: set[str] = set()
    for s in out["steps"]:
        name = s["attack"]
        if name == "forwarded" or name in failed:
            continue
        if s["holds"]:
            best[name] = s["rate"]
        else:
            failed.add(name)
            best.setdefault(name, 0.0)
    return best


def headline(out: dict[str, Any]) -> dict[str, Any]:
    """The figures run_all's summary reads."""
    ref = fwd_reference(out["steps"])
    top = max(ref)
    at_top = {
        s["attack"]: s["relay_us_per_datagram"] / ref[top]
        for s in out["steps"]
        if s["attack"] in DATAGRAM_ATTACKS and s["rate"] == top
    }
    holds = held(out)
    posts = {k: v for k, v in holds.items() if k not in DATAGRAM_ATTACKS}
    return {
        "held_per_attack": holds,
        "datagram_rate_held_by_all": min(holds[k] for k in DATAGRAM_ATTACKS),
        "post_rate_held_auth_on": min(v for k, v in posts.items() if "auth on" in k),
        "post_rate_held_auth_off": min(v for k, v in posts.items() if "auth off" in k),
        "junk_over_forwarded_at_top_rate": at_top,
        "worst_junk_over_forwarded": max(at_top.values()),
        "worst_kind": max(at_top, key=lambda k: at_top[k]),
        "top_rate": top,
        "forwarded_us_at_top_rate": ref[top],
        "honest_us_per_forwarded": out["baseline"]["relay_us_per_forwarded"],
    }


def summary_lines(out: dict[str, Any]) -> list[str]:
    """The headline in words."""
    h = out["headline"]
    held_by = ", ".join(f"{k} {v:,.0f}/s" for k, v in h["held_per_attack"].items())
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in h["junk_over_forwarded_at_top_rate"].items())
    return [
        f"held (highest rate of the ramp, every lower one held too): {held_by}",
        f"relay CPU per attack datagram / forwarded at {h['top_rate']:,.0f}/s "
        f"({h['forwarded_us_at_top_rate']:.2f} us): {ratios} (budget <= 1x)",
        f"whole run {out['seconds_total']:.0f} s",
    ]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default=RATES, help="attack datagrams/s, rising")
    p.add_argument("--post-rates", default=POST_RATES, help="attack POSTs/s, rising")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each step")
    p.add_argument("--calls", type=int, default=16, help="honest calls running all along")
    p.add_argument("--newcomers", type=int, default=3, help="new honest calls a step")
    p.add_argument("--quick", action="store_true", help="short steps, two rates each (~1.5 min)")
    p.add_argument("--attacker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.seconds, args.calls, args.newcomers = 1.5, 8, 2
        args.rates, args.post_rates = "5000,50000", "500,3000"
    return args


def main() -> None:
    args = parse()
    if args.attacker:
        attacker_main(args.attacker)
        return
    info = harness.machine()
    started = time.monotonic()
    out = run_phases(args)
    out["headline"] = headline(out)
    out["parameters"] = {k: v for k, v in vars(args).items() if k != "attacker"}
    out["seconds_total"] = time.monotonic() - started
    tables = [datagram_table(out), post_table(out), "\n".join(summary_lines(out))]
    harness.report("flood", tables, out, info)


if __name__ == "__main__":
    main()
