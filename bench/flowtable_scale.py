"""Flow-table scale: insert, lookup, flush and expiry cost, memory and restart time, 1k-1M flows.

Budget (docs/DESIGN.md): "flow table: cost flat from 1k to 1M flows; <= 64 bytes a flow".

For each size N a fresh two-shard table lives in real shared memory, every shard holding N
flows at a load factor of 50% (capacity 2N slots a shard). Shard 0 belongs to the worker under
test: a `ShardWriter` fills it, then a `RelayRouter` is rebuilt from it as a restarted worker
would. Shard 1 is "another worker" whose flows are found by the lock-free cross-shard lookup.
Clients are distinct hosts (1 in 8 IPv6 by default, on a dual-stack public socket) on assorted
ports. Every timed batch visits its own random sample of flows, so large tables pay their real
cache misses and address-cache misses; the "hot" variant sends all packets to 1k of the N flows.
Costs are ns per call over a batch of calls (loop overhead included, see "loop floor"), the
best of several batches, with the process pinned to one core. The restart figures come from a
fresh interpreter that attaches to the full table, as a restarted worker does; its resident
anonymous memory (RssAnon) before and after is the worker's in-process memory for the flows.
Benchmarks print figures; nothing here passes or fails.

    .venv/bin/python bench/flowtable_scale.py            # 1k, 10k, 100k, 1M (~2 min)
    .venv/bin/python bench/flowtable_scale.py --quick    # up to 100k (~20 s)
    .venv/bin/python bench/flowtable_scale.py --sizes 1000,50000 --ipv6-every 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import random
import resource
import socket
import statistics
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import harness

from voicerelay.relay.router import RelayRouter
from voicerelay.shm import flowtable
from voicerelay.shm.flowtable import FlowTable, ShardWriter
from voicerelay.wire import addr, envelope
from voicerelay.wire.addr import Addr
from voicerelay.wire.token import TokenKeys

SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_MAX = 100_000
LOAD = 0.5  # flows / slots in every shard
SHARDS = 2
HOT = 1_000  # active flows of the "hot" variant
IDLE = 30.0  # the relay's default idle timeout (s)
TICK = 0.1  # the worker's flush/expiry period (s), voicerelay/relay/worker.py
T0 = 1000.0  # monotonic "now" at which every flow is created
PACKET = b"\x80\x00" + bytes(170)  # an RTP-like datagram (first byte > 3: the fast path)
TRANSCEIVERS: tuple[Addr, ...] = tuple(("127.0.0.1", 5001 + i) for i in range(4))
KEYS = TokenKeys({0: bytes(32)}, 0)
Run = Callable[[list[Any]], object]  # runs one call per item of a batch


# Workload --------------------------------------------------------------------------------------
def client(i: int, ipv6_every: int) -> Addr:
    """Client number `i`: a distinct host (10/8, or 2001:db8::/32) and a port."""
    port = 1024 + (i * 7919) % 64000
    if ipv6_every and i % ipv6_every == 0:
        raw = b"\x20\x01\x0d\xb8" + bytes(4) + (i + 1).to_bytes(8, "big")
        return socket.inet_ntop(socket.AF_INET6, raw), port
    return socket.inet_ntop(socket.AF_INET, (0x0A000000 + i).to_bytes(4, "big")), port


def clients(start: int, count: int, ipv6_every: int) -> list[Addr]:
    return [client(i, ipv6_every) for i in range(start, start + count)]


def batches(population: Sequence[Any], k: int, reps: int, rng: random.Random) -> list[list[Any]]:
    """`reps` random batches of `k` items, disjoint when the population is large enough."""
    if len(population) >= k * reps:
        picked = rng.sample(population, k * reps)
        return [picked[r * k : (r + 1) * k] for r in range(reps)]
    return [[rng.choice(population) for _ in range(k)] for _ in range(reps)]


def router_options(ipv6_every: int) -> dict[str, int]:
    """Socket families for routers that take them: dual-stack public socket if IPv6 is used."""
    params = inspect.signature(RelayRouter).parameters
    options = {"idle_timeout": IDLE, "expire_interval": TICK}
    if "public_family" in params:
        options["public_family"] = socket.AF_INET6 if ipv6_every else socket.AF_INET
        options["internal_family"] = socket.AF_INET
    return options


def clear_addr_caches() -> None:
    """Empty the `lru_cache`d address conversions, as in a freshly started worker."""
    for name in ("pack_ip", "unpack_ip", "sockaddr", "addr_from_sockaddr"):
        fn = getattr(addr, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()


def rss_anon() -> int:
    """Resident anonymous (private heap) bytes of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


# Timing ----------------------------------------------------------------------------------------
def ns_per_call(
    run: Run, work: list[list[Any]], setup: Callable[[], object] | None = None
) -> float:
    """Best over the batches (least disturbed by other processes) of ns / item of `run`."""
    values = []
    for batch in work:
        if setup is not None:
            setup()
        t = time.perf_counter_ns()
        run(batch)
        values.append((time.perf_counter_ns() - t) / max(1, len(batch)))
    return min(values)


def elapsed_ns(fn: Callable[[], Any]) -> tuple[int, Any]:
    t = time.perf_counter_ns()
    result = fn()
    return time.perf_counter_ns() - t, result


def loop_floor_ns(k: int, reps: int) -> float:
    """ns of the loop calling a no-op: the floor under every per-call figure."""

    def noop(_: Addr) -> None:
        return None

    def run(batch: list[Addr]) -> None:
        for c in batch:
            noop(c)

    return ns_per_call(run, [[("10.0.0.1", 1)] * k] * reps)


# Measurements ----------------------------------------------------------------------------------
def insert(writer: ShardWriter, flows: Sequence[Addr], batch: int) -> dict[str, float]:
    """Fill the shard with fresh flows, timing batches: median batch and whole-fill ns/put."""
    put = writer.put
    per_batch = []
    total = 0
    for start in range(0, len(flows), batch):
        chunk = flows[start : start + batch]
        t = time.perf_counter_ns()
        for i, c in enumerate(chunk, start):
            put(c, TRANSCEIVERS[i & 3], T0)
        dt = time.perf_counter_ns() - t
        total += dt
        per_batch.append(dt / len(chunk))
    return {"put_ns": statistics.median(per_batch), "put_fill_mean_ns": total / len(flows)}


def fill(writer: ShardWriter, flows: Sequence[Addr]) -> None:
    for i, c in enumerate(flows):
        writer.put(c, TRANSCEIVERS[i & 3], T0)


def mean_probe(writer: ShardWriter) -> float:
    """Mean slots a hit probes (1 = found at its home slot): how the hash clusters."""
    cap, buf = writer.capacity, writer.table.buf
    base = writer.table.slot_offset(writer.shard_index, 0)
    total = used = 0
    for slot in range(cap):
        off = base + slot * flowtable.SLOT_SIZE
        if buf[off + 4] == flowtable.USED:
            key = bytes(buf[off + 5 : off + 24])
            total += (slot - zlib.crc32(key) % cap) % cap + 1
            used += 1
    return total / max(1, used)


def adopt_all(router: RelayRouter, flows: Sequence[Addr]) -> int:
    """Each flow's first packet at a fresh router (it adopts flows from its shard lazily);
    returns the ns it took for all of them."""
    now, route = T0 + 0.01, router.from_client

    def first_packets() -> None:
        for c in flows:
            route(PACKET, c, now)

    dt, _ = elapsed_ns(first_packets)
    router.dirty.clear()
    return dt


def writer_gets(writer: ShardWriter, hits: list[list[Addr]], misses: list[list[Addr]]) -> dict:
    """The adopt path's first look: a probe of the own shard plus one slot decode."""
    get = writer.get

    def run(batch: list[Addr]) -> None:
        for c in batch:
            get(c)

    assert all(get(c) is not None for c in hits[0][:100])
    before = addr.pack_ip.cache_info()
    hit_ns = ns_per_call(run, hits)
    after = addr.pack_ip.cache_info()
    calls = after.hits + after.misses - before.hits - before.misses
    return {
        "get_hit_ns": hit_ns,
        "get_miss_ns": ns_per_call(run, misses),
        "pack_ip_cache_hit_rate": (after.hits - before.hits) / max(1, calls),
    }


def table_lookups(table: FlowTable, hits: list[list[Addr]], misses: list[list[Addr]]) -> dict:
    """The seqlock reads: another worker's flow (adoption: skip the own shard), and a miss
    in every shard (the return path of an unknown client)."""
    lookup = table.lookup

    def run_hits(batch: list[Addr]) -> None:
        for c in batch:
            lookup(c, 0)

    def run_misses(batch: list[Addr]) -> None:
        for c in batch:
            lookup(c)

    assert all(lookup(c, 0) is not None for c in hits[0][:100])
    return {
        "lookup_hit_ns": ns_per_call(run_hits, hits),
        "lookup_miss_ns": ns_per_call(run_misses, misses),
    }


def router_paths(router: RelayRouter, spread: list[list[Addr]], hot: list[list[Addr]]) -> dict:
    """Per-packet cost for known flows: `from_client`/`from_transceiver` (addresses) and,
    where the router has them, `client_datagram`/`transceiver_datagram` (raw sockaddr bytes,
    what the worker's batched I/O calls), packets spread over all N flows or on `HOT` flows."""
    flows, now, clear = router.flows, T0 + 0.05, router.dirty.clear
    from_client, from_transceiver = router.from_client, router.from_transceiver

    def run_client(batch: list[Addr]) -> None:
        for c in batch:
            from_client(PACKET, c, now)

    def run_transceiver(batch: list[tuple[bytes, Addr]]) -> None:
        for data, source in batch:
            from_transceiver(data, source, now)

    replies = [[(envelope.pack(c, PACKET), flows[c].transceiver) for c in b] for b in spread]
    assert from_client(PACKET, spread[0][0], now) is not None
    assert from_transceiver(*replies[0][0], now) is not None
    out = {
        "from_client_ns": ns_per_call(run_client, spread, clear),
        "from_client_hot_ns": ns_per_call(run_client, hot, clear),
        "from_transceiver_ns": ns_per_call(run_transceiver, replies, clear),
    }
    if hasattr(router, "client_datagram"):
        out.update(datagram_paths(router, spread, hot))
    clear()
    return out


def datagram_paths(router: RelayRouter, spread: list[list[Addr]], hot: list[list[Addr]]) -> dict:
    """The sockaddr-keyed hot path, with peers as fresh bytes objects (as recvmmsg gives)."""
    flows, now, clear = router.flows, T0 + 0.05, router.dirty.clear
    client_datagram = router.client_datagram
    transceiver_datagram = router.transceiver_datagram

    def run_client(batch: list[bytes]) -> None:
        for peer in batch:
            client_datagram(PACKET, peer, now)

    def run_transceiver(batch: list[tuple[bytes, bytes]]) -> None:
        for data, peer in batch:
            transceiver_datagram(data, peer, now)

    def peers(work: list[list[Addr]]) -> list[list[bytes]]:
        return [[bytes(bytearray(flows[c].peer)) for c in b] for b in work]

    replies = [
        [(envelope.pack(c, PACKET), bytes(bytearray(flows[c].transceiver_peer))) for c in b]
        for b in spread
    ]
    spread_peers = peers(spread)
    assert client_datagram(PACKET, spread_peers[0][0], now) is not None
    assert transceiver_datagram(*replies[0][0], now) is not None
    return {
        "client_datagram_ns": ns_per_call(run_client, spread_peers, clear),
        "client_datagram_hot_ns": ns_per_call(run_client, peers(hot), clear),
        "transceiver_datagram_ns": ns_per_call(run_transceiver, replies, clear),
    }


def flush_cost(router: RelayRouter, work: list[list[Addr]]) -> float:
    """ns per dirty flow written to shared memory by `router.flush` (best over batches)."""
    values = []
    for batch in work:
        router.dirty.update(router.flows[c] for c in batch)
        dt, count = elapsed_ns(lambda: router.flush(T0 + 0.1))
        values.append(dt / max(1, count))
    return min(values)


def expire_slice(router: RelayRouter, ticks: int) -> dict[str, float]:
    """One timer tick of expiry when nothing is idle: `expire_budget` slots scanned."""
    values = []
    for _ in range(ticks):
        dt, removed = elapsed_ns(lambda: router.expire(T0 + 1.0))
        assert not removed
        values.append(dt)
    tick = statistics.median(values)
    return {"expire_tick_us": tick / 1e3, "expire_slot_ns": tick / router.expire_budget}


def expire_sweep(router: RelayRouter) -> dict[str, float]:
    """Every flow idle: tick after tick until the shard is empty (destroys the shard)."""
    now = T0 + IDLE + 1.0
    held = len(router.writer)
    ticks: list[int] = []
    per_flow: list[float] = []
    removed = 0
    for _ in range(math.ceil(router.writer.capacity / router.expire_budget) + 2):
        dt, gone = elapsed_ns(lambda: router.expire(now))
        ticks.append(dt)
        removed += len(gone)
        if gone:
            per_flow.append(dt / len(gone))
        if not len(router.writer):
            break
    assert removed == held and not router.flows, (removed, held, len(router.flows))
    return {
        "expire_flow_ns": statistics.median(per_flow),
        "sweep_total_ms": sum(ticks) / 1e6,
        "sweep_ticks": len(ticks),
        "sweep_tick_p50_ms": harness.percentile(ticks, 50) / 1e6,
        "sweep_worst_tick_ms": max(ticks) / 1e6,
    }


# Restart: a fresh process attaching to the full table -----------------------------------------
def restart_child(name: str, ipv6_every: int) -> None:
    """Run in a fresh interpreter: attach, rebuild writer then router; print one JSON line."""
    gc.collect()
    table = FlowTable.attach(name)
    rss0 = rss_anon()
    attach_ns, writer = elapsed_ns(lambda: table.shard(0))
    rss1 = rss_anon()
    build_ns, router = elapsed_ns(lambda: RelayRouter(KEYS, table, 0, **router_options(ipv6_every)))
    rss2 = rss_anon()
    flows = clients(0, len(writer), ipv6_every)
    adopt_ns = adopt_all(router, flows)
    rss3 = rss_anon()
    doc = {
        "attach_writer_ms": attach_ns / 1e6,
        "attach_router_ms": build_ns / 1e6,
        "adopt_flow_ns": adopt_ns / max(1, len(flows)),
        "writer_rss_bytes": rss1 - rss0,
        "router_rss_bytes": rss3 - rss2,
        "router_flows": len(router.flows),
        "writer_flows": len(writer),
    }
    print(json.dumps(doc), flush=True)
    os._exit(0)  # skip tearing down millions of objects (and closing the exported buffer)


def restart(name: str, ipv6_every: int, runs: int, core: int) -> dict[str, Any]:
    """Best of `runs` restarted workers (fresh processes), pinned to the core under test."""
    cmd = [sys.executable, __file__, "--restart-child", name, "--ipv6-every", str(ipv6_every)]
    docs = [harness.run_json(cmd, core=core, timeout=600) for _ in range(runs)]
    best = min(docs, key=lambda d: d["attach_router_ms"])
    best["attach_writer_ms"] = min(d["attach_writer_ms"] for d in docs)
    return best


# One size --------------------------------------------------------------------------------------
def measure(n: int, k: int, reps: int, ipv6_every: int, core: int, rng: random.Random) -> dict:
    """Every figure for a table holding `n` flows in each shard."""
    capacity = max(16, round(n / LOAD))
    own, other = clients(0, n, ipv6_every), clients(n, n, ipv6_every)
    unknown = clients(2 * n, k * reps, ipv6_every)
    name = f"vr-bench-ft-{uuid.uuid4().hex[:12]}"
    table = FlowTable.create(name, shards=SHARDS, capacity=capacity, now=T0)
    try:
        clear_addr_caches()
        gc.collect()
        writer = table.shard(0)
        fig: dict[str, Any] = {"flows_per_shard": n, "capacity_per_shard": capacity}
        fig.update(insert(writer, own, batch=max(100, min(5000, n // 20))))
        fill(table.shard(1), other)
        fig["mean_probe_slots"] = mean_probe(writer)
        misses = [unknown[r * k : (r + 1) * k] for r in range(reps)]
        fig.update(writer_gets(writer, batches(own, k, reps, rng), misses))
        del writer
        fig.update(table_lookups(table, batches(other, k, reps, rng), misses))
        fig.update(restart(name, ipv6_every, runs=3 if n <= QUICK_MAX else 1, core=core))
        clear_addr_caches()
        gc.collect()
        router = RelayRouter(KEYS, table, 0, **router_options(ipv6_every))
        adopt_all(router, own)
        kept = [c for c in own if c in router.flows]
        spread = batches(kept, k, reps, rng)
        fig.update(router_paths(router, spread, batches(kept[:HOT], k, reps, rng)))
        fig["flush_flow_ns"] = flush_cost(router, spread)
        fig["expire_budget_slots"] = router.expire_budget
        fig.update(expire_slice(router, ticks=max(5, reps * 4)))
        fig.update(expire_sweep(router))
        size = FlowTable.size_for(SHARDS, capacity)
        fig.update(
            shm_bytes=size,
            shm_mib=size / 2**20,
            shm_bytes_per_slot=flowtable.SLOT_SIZE,
            shm_bytes_per_flow=size / (SHARDS * n),
            writer_bytes_per_flow=fig["writer_rss_bytes"] / n,
            adopt_flow_us=fig["adopt_flow_ns"] / 1e3,
            router_bytes_per_flow=fig["router_rss_bytes"] / max(1, fig["router_flows"]),
            flush_tick_all_dirty_ms=fig["flush_flow_ns"] * n / 1e6,
            expire_cpu_share=fig["expire_tick_us"] / 1e6 / TICK,
        )
        return fig
    finally:
        table.unlink()
        gc.collect()
        with contextlib.suppress(BufferError):  # a view still held after an error
            table.close()


# Output ----------------------------------------------------------------------------------------
TABLE_COSTS = (
    ("put", "put_ns"),
    ("get hit", "get_hit_ns"),
    ("get miss", "get_miss_ns"),
    ("lookup hit", "lookup_hit_ns"),
    ("lookup miss", "lookup_miss_ns"),
    ("flush/flow", "flush_flow_ns"),
    ("expire/slot", "expire_slot_ns"),
    ("expire/flow", "expire_flow_ns"),
)
ROUTER_COSTS = (
    ("from_client", "from_client_ns"),
    ("(hot)", "from_client_hot_ns"),
    ("from_transceiver", "from_transceiver_ns"),
    ("client_datagram", "client_datagram_ns"),
    ("(hot)", "client_datagram_hot_ns"),
    ("transceiver_datagram", "transceiver_datagram_ns"),
)
MEMORY = (
    ("flows/shard", "flows_per_shard"),
    ("slots/shard", "capacity_per_shard"),
    ("shm MiB", "shm_mib"),
    ("shm B/flow", "shm_bytes_per_flow"),
    ("index B/flow", "writer_bytes_per_flow"),
    ("worker B/flow", "router_bytes_per_flow"),
    ("mean probe", "mean_probe_slots"),
    ("ip cache hits", "pack_ip_cache_hit_rate"),
)
TICKS = (
    ("flows/shard", "flows_per_shard"),
    ("attach ms", "attach_writer_ms"),
    ("restart ms", "attach_router_ms"),
    ("adopt us/flow", "adopt_flow_us"),
    ("expire slots/tick", "expire_budget_slots"),
    ("expire us/tick", "expire_tick_us"),
    ("sweep tick ms", "sweep_tick_p50_ms"),
    ("sweep worst ms", "sweep_worst_tick_ms"),
    ("flush all ms", "flush_tick_all_dirty_ms"),
)


def cost_tables(title: str, columns: Sequence[tuple[str, str]], rows: list[dict]) -> list[str]:
    """The costs, then each as a ratio to the smallest size ("flat?": 1.0 is flat)."""
    columns = [(label, key) for label, key in columns if key in rows[0]]
    base = rows[0]
    headers = ["flows/shard", *(label for label, _ in columns)]
    values = [[r["flows_per_shard"], *(r[key] for _, key in columns)] for r in rows]
    ratios = [[r["flows_per_shard"], *(r[key] / base[key] for _, key in columns)] for r in rows]
    flat = f"flat? {title}: cost at N / cost at N={base['flows_per_shard']:,}"
    return [harness.table(title, headers, values), harness.table(flat, headers, ratios)]


def plain_table(title: str, columns: Sequence[tuple[str, str]], rows: list[dict]) -> str:
    return harness.table(
        title, [label for label, _ in columns], [[r[key] for _, key in columns] for r in rows]
    )


def tables(rows: list[dict[str, Any]], floor: float, peak: float) -> list[str]:
    return [
        *cost_tables("shared table, ns per call or per flow", TABLE_COSTS, rows),
        *cost_tables("router, ns per packet of a known flow", ROUTER_COSTS, rows),
        plain_table(
            f"memory (shm: {flowtable.SLOT_SIZE} B a slot, load {LOAD:.0%}, {SHARDS} shards;"
            " index and worker: RssAnon of a fresh worker process)",
            MEMORY,
            rows,
        ),
        plain_table(
            f"restart and timer ticks (idle {IDLE:g} s, tick {TICK:g} s; flush all: every flow"
            " dirty)",
            TICKS,
            rows,
        ),
        f"loop floor {floor:.0f} ns a call (included in every per-call figure);"
        f" peak RSS of this process {peak:,.0f} MiB",
    ]


# Main ------------------------------------------------------------------------------------------
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="comma-separated flows per shard (default 1k..1M)")
    parser.add_argument("--quick", action="store_true", help="stop at 100k, fewer repetitions")
    parser.add_argument("--calls", type=int, help="calls per timed batch (20000, quick 10000)")
    parser.add_argument("--reps", type=int, help="batches per figure (5, quick 3)")
    parser.add_argument("--ipv6-every", type=int, default=8, help="1 client in N is IPv6 (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--restart-child", metavar="SHM", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.restart_child:
        restart_child(args.restart_child, args.ipv6_every)
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    if args.quick:
        sizes = [s for s in sizes if s <= QUICK_MAX]
    calls = args.calls or (10_000 if args.quick else 20_000)
    reps = args.reps or (3 if args.quick else 5)
    info = harness.machine()
    core = harness.cores()[1]
    harness.pin(os.getpid(), core)
    rng = random.Random(args.seed)
    rows = []
    for n in sizes:
        t = time.monotonic()
        rows.append(measure(n, calls, reps, args.ipv6_every, core, rng))
        print(f"  {n:>9,} flows/shard measured in {time.monotonic() - t:.1f} s", flush=True)
    floor = loop_floor_ns(calls, reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {
        "parameters": {
            "sizes": sizes,
            "load_factor": LOAD,
            "shards": SHARDS,
            "calls_per_batch": calls,
            "reps": reps,
            "hot_flows": HOT,
            "ipv6_share": 1 / args.ipv6_every if args.ipv6_every else 0.0,
            "router_options": router_options(args.ipv6_every),
            "idle_timeout": IDLE,
            "tick": TICK,
            "packet_bytes": len(PACKET),
            "quick": args.quick,
            "pinned_core": core,
            "seed": args.seed,
        },
        "loop_floor_ns": floor,
        "peak_rss_mib": peak,
        "sizes": rows,
    }
    harness.report("flowtable_scale", tables(rows, floor, peak), figures, info)


if __name__ == "__main__":
    main()
