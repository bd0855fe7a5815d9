"""The router alone: each kind of junk datagram's cost against a forwarded one, in process.

`RelayRouter.client_datagram` with no sockets and no kernel, at 2 and 16 shards.

    .venv/bin/python bench/router_junk.py [--quick] [--shards 2,16] [--flows 2000]

A real flow table in shared memory holds `--flows` live flows in every shard: the router's own
(opened through its real first-packet path with fresh tokens, then answered) and, in the other
shards, other workers' flows. Each kind of datagram below is routed `--calls` times from its
own pool of sources (time.perf_counter around the loop; best of `--reps` runs) with the clock
past the adoption window, as in a worker that has run for more than `ADOPT_WINDOW` seconds:

- forwarded: RTP from a known flow (the baseline of every ratio);
- junk from unknown sources by first byte: RTP range, DTLS range, STUN range (not a Binding
  request), outside RFC 7983 (unknown protocol); and unknown protocol from a known flow;
- STUN Binding requests: a forged token-shaped ufrag (one AES-GCM open that fails), a valid
  token past its client cap (an open that succeeds), an expired token (an open, a search of
  the other shards and a look for its in-use mark in every shard), from a rate-limited /24
  (refused before any open);
- hop envelopes (first byte 'V', what an upstream relay of another cluster sends): malformed,
  and well-formed around a forged-token Binding request;
- RTP junk from unknown sources within `ADOPT_WINDOW` of a worker start (the only time an
  unknown source is searched for in the other shards).

Every row says which counter took its datagrams (a self-check: the router dropped them for the
reason the row claims). `--calls` sources a kind, all distinct, so the address caches miss as
they would with spoofed sources. Figures include the Python loop (`loop floor`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import harness

from voicerelay.relay.router import ADOPT_WINDOW, RelayRouter
from voicerelay.shm.flowtable import FlowTable
from voicerelay.wire import envelope, stun
from voicerelay.wire.addr import Addr, sockaddr
from voicerelay.wire.token import TokenKeys

T0 = 1000.0  # monotonic time the router starts
NOW = T0 + ADOPT_WINDOW + 10.0  # measurements: well past the adoption window
TRANSCEIVER: Addr = ("10.255.0.1", 4000)
RTP = b"\x80\x6f" + bytes(170)  # an Opus-sized RTP datagram (172 B)
TOKEN_RAW = 42  # raw bytes of an IPv4 routing token (key id, nonce, sealed route, tag)
Item = tuple[bytes, bytes]  # (datagram, peer sockaddr)
UNKNOWN_FLOW, UNKNOWN_PROTOCOL = "drop_unknown_flow", "drop_unknown_protocol"


@dataclass
class Kind:
    """One kind of datagram: its label, its (datagram, peer) items, the counter every one of
    them must land in, and the clock it is routed at."""

    label: str
    items: list[Item]
    counter: str
    now: float = NOW


# Addresses -----------------------------------------------------------------------------------
def host(net: int, i: int) -> str:
    """Host `i` under `net`.0.0.0/8: distinct for every `i`, each of the first 65,536 in a /24
    of its own."""
    return f"{net}.{(i >> 8) & 255}.{i & 255}.{1 + (i >> 16)}"


def peers(net: int, count: int) -> list[bytes]:
    """`count` distinct source sockaddrs under `net`.0.0.0/8 (see `host`)."""
    return [sockaddr((host(net, i), 1024 + i % 50000), socket.AF_INET) for i in range(count)]


def one_prefix_peers(count: int, skip: int = 0) -> list[bytes]:
    """`count` distinct sources in one /24 (192.0.2.0/24, many ports), after the first `skip`."""
    return [
        sockaddr((f"192.0.2.{1 + i % 254}", 1024 + i // 254), socket.AF_INET)
        for i in range(skip, skip + count)
    ]


# Datagrams -----------------------------------------------------------------------------------
def binding(ufrag: str | bytes) -> bytes:
    """A Binding request whose USERNAME starts with `ufrag` (integrity unchecked by relays)."""
    text = ufrag.decode() if isinstance(ufrag, bytes) else ufrag
    return stun.build(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [(stun.ATTR_USERNAME, f"{text}:cli".encode())],
        integrity_key=b"unknown to the relay",
    )


def forged_ufrag(key_id: int) -> str:
    """Token-shaped: the right length, alphabet and key id, random inside (fails AES-GCM)."""
    raw = bytes([key_id]) + os.urandom(TOKEN_RAW - 1)
    return base64.b64encode(raw).rstrip(b"=").decode()


def junk(first: int, size: int = 172) -> bytes:
    return bytes([first]) + os.urandom(size - 1)


def hop_items(keys: TokenKeys, calls: int) -> list[Item]:
    """Well-formed hop envelopes (what an upstream relay sends) from unknown sources, each
    naming a client of its own around a Binding request with a forged token-shaped ufrag."""
    inner = [binding(forged_ufrag(keys.current)) for _ in range(1000)]
    sources = peers(39, calls)
    return [
        (envelope.pack((host(40, i), 1024 + i % 50000), inner[i % len(inner)]), sources[i])
        for i in range(calls)
    ]


# Setup ---------------------------------------------------------------------------------------
def make_router(table: FlowTable, keys: TokenKeys, flows: int) -> tuple[RelayRouter, list[bytes]]:
    """A worker's router on shard 0 with `flows` answered flows, opened the real way (one fresh
    token each, each client in its own /24); returns it and the flows' peers."""
    router = RelayRouter(keys, table, 0, now=T0, wall_offset=time.time() - NOW)
    own = peers(11, flows)
    setup = T0 + 1.0
    for peer in own:
        first = binding(keys.seal(0, TRANSCEIVER))
        assert router.client_datagram(first, peer, setup) is not None, router.drops
    for flow in list(router.flows.values()):
        reply = envelope.pack(flow.client, RTP)
        assert router.transceiver_datagram(reply, flow.transceiver_peer, setup) is not None
    router.flush(setup)
    return router, own


def fill_other_shards(table: FlowTable, flows: int) -> None:
    """Other workers' flows: `flows` in every shard but 0."""
    for shard in range(1, table.shards):
        writer = table.shard(shard)
        for i in range(flows):
            writer.put((host(100 + shard, i), 2000 + i % 50000), TRANSCEIVER, T0 + 1.0)


def capped_token(router: RelayRouter, keys: TokenKeys) -> str:
    """A fresh token already used by `token_clients` sources: every other source is refused."""
    token = keys.seal(0, TRANSCEIVER)
    for peer in peers(12, router.token_clients):
        assert router.client_datagram(binding(token), peer, T0 + 2.0) is not None
    return token


def drained_prefix(router: RelayRouter, count: int) -> list[bytes]:
    """`count` new sources in one /24 whose new-flow bucket the router has just emptied."""
    burst = int(router.limiter.burst) + 1
    for peer in one_prefix_peers(burst):  # each its own token: only the prefix limit applies
        router.client_datagram(binding(router.keys.seal(0, TRANSCEIVER)), peer, NOW)
    return one_prefix_peers(count, skip=burst)


def kinds(router: RelayRouter, keys: TokenKeys, own: list[bytes], calls: int) -> list[Kind]:
    """Every kind of datagram measured, `calls` items each."""

    def cycle(datagrams: list[bytes], sources: list[bytes]) -> list[Item]:
        return [(datagrams[i % len(datagrams)], sources[i % len(sources)]) for i in range(calls)]

    pool = 1000  # distinct datagrams a kind (ufrags, random bodies)
    capped = capped_token(router, keys)
    expired = keys.seal(0, TRANSCEIVER, time.time() - 3600)
    limited = drained_prefix(router, calls)
    return [
        Kind("forwarded (RTP, known flow)", cycle([RTP], own), "packets_in"),
        Kind("junk RTP range, unknown source", cycle([junk(0x80)], peers(30, calls)), UNKNOWN_FLOW),
        Kind(
            "junk DTLS range, unknown source", cycle([junk(0x16)], peers(31, calls)), UNKNOWN_FLOW
        ),
        Kind(
            "junk STUN range, not a Binding",
            cycle([junk(0x00) for _ in range(pool)], peers(32, calls)),
            UNKNOWN_FLOW,
        ),
        Kind(
            "junk unknown protocol, unknown src",
            cycle([junk(0x42)], peers(33, calls)),
            UNKNOWN_PROTOCOL,
        ),
        Kind("junk unknown protocol, known flow", cycle([junk(0x42)], own), UNKNOWN_PROTOCOL),
        Kind(
            "STUN forged token-shaped ufrag",
            cycle([binding(forged_ufrag(keys.current)) for _ in range(pool)], peers(34, calls)),
            "drop_bad_token",
        ),
        Kind(
            "STUN valid token past its cap",
            cycle([binding(capped) for _ in range(pool)], peers(35, calls)),
            "drop_token_clients",
        ),
        Kind(
            "STUN expired token (marks scan)",
            cycle([binding(expired) for _ in range(pool)], peers(36, calls)),
            "drop_token_expired",
        ),
        Kind(
            "hop envelope junk ('V', malformed)",
            cycle([b"V" + junk(0x00, 171) for _ in range(pool)], peers(38, calls)),
            "drop_envelope_malformed",
        ),
        Kind(
            "hop envelope, forged token",
            hop_items(keys, calls),
            "drop_bad_token",
        ),
        Kind(
            "STUN from a rate-limited /24",
            cycle([binding(keys.seal(0, TRANSCEIVER)) for _ in range(pool)], limited),
            "drop_rate_limited",
        ),
        Kind(
            f"junk RTP range, within {ADOPT_WINDOW:g} s of a start",
            cycle([junk(0x80)], peers(37, calls)),
            UNKNOWN_FLOW,
            now=router.adopt_until - 1.0,
        ),
    ]


# Measuring -----------------------------------------------------------------------------------
def landed(router: RelayRouter, before: dict[str, int], kind: Kind) -> str:
    """Which counters took one run's datagrams ("unknown_flow 100%", ...); a "!" first when
    not every datagram landed where the kind says (the row then measures something else)."""
    after = router.counters()
    moved = {k: after[k] - before[k] for k in after if k.startswith(("drop_", "packets_in"))}
    named = sorted(((v, k) for k, v in moved.items() if v > 0), reverse=True)
    text = ", ".join(f"{k.removeprefix('drop_')} {v / len(kind.items):.0%}" for v, k in named)
    searched = after["shard_searches"] - before["shard_searches"]
    if searched:
        text += f"; {searched / len(kind.items):.0%} searched other shards"
    return ("" if moved[kind.counter] == len(kind.items) else "! ") + (text or "nothing")


def time_kind(router: RelayRouter, kind: Kind, reps: int) -> tuple[float, str]:
    """Best of `reps` runs over the kind's items: ns a call, and where the first run landed."""
    route, now, items = router.client_datagram, kind.now, kind.items
    best, where = float("inf"), ""
    for rep in range(reps):
        before = router.counters()
        gc.disable()
        t = time.perf_counter()
        for data, peer in items:
            route(data, peer, now)
        elapsed = time.perf_counter() - t
        gc.enable()
        if rep == 0:
            where = landed(router, before, kind)
        router.dirty.clear()
        best = min(best, elapsed * 1e9 / len(items))
    return best, where


def loop_floor(calls: int, reps: int) -> float:
    """ns a call of the same loop around a function that does nothing."""

    def noop(data: bytes, peer: bytes, now: float) -> None:
        return None

    items = [(RTP, b"")] * calls
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for data, peer in items:
            noop(data, peer, NOW)
        best = min(best, (time.perf_counter() - t) * 1e9 / calls)
    return best


@contextlib.contextmanager
def flow_table(shards: int, flows: int) -> Iterator[FlowTable]:
    """A fresh table in shared memory, `shards` shards at 50 % load; unlinked after."""
    table = FlowTable.create(f"vr-bench-junk-{uuid.uuid4().hex[:12]}", shards, 2 * flows, T0)
    try:
        yield table
    finally:
        table.unlink()
        gc.collect()
        with contextlib.suppress(BufferError):
            table.close()


def measure(shards: int, flows: int, calls: int, reps: int) -> list[dict[str, Any]]:
    """Every kind at one shard count: ns a call, ratio to forwarded, counted as."""
    keys = TokenKeys({0: os.urandom(32)}, 0)
    with flow_table(shards, flows) as table:
        fill_other_shards(table, flows)
        router, own = make_router(table, keys, flows)
        rows = []
        for kind in kinds(router, keys, own, calls):
            ns, where = time_kind(router, kind, reps)
            rows.append({"shards": shards, "kind": kind.label, "ns": ns, "counted_as": where})
        del router
    base = rows[0]["ns"]
    for row in rows:
        row["over_forwarded"] = row["ns"] / base
    return rows


# Main ----------------------------------------------------------------------------------------
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="2,16", help="shard counts (workers) to measure")
    p.add_argument("--flows", type=int, default=2000, help="live flows in every shard")
    p.add_argument("--calls", type=int, default=100_000, help="calls a run")
    p.add_argument("--reps", type=int, default=5, help="runs a kind (the best counts)")
    p.add_argument("--quick", action="store_true", help="20,000 calls, best of 3")
    args = p.parse_args()
    if args.quick:
        args.calls, args.reps = 20_000, 3
    return args


def report_rows(rows: list[dict[str, Any]], shard_counts: list[int]) -> list[str]:
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], {})[row["shards"]] = row
    headers = ["datagram", *(f"ns ({s} sh)" for s in shard_counts)]
    headers += [*(f"x fwd ({s} sh)" for s in shard_counts), "counted as"]
    lines = []
    for kind, per in by_kind.items():
        lines.append(
            [
                kind,
                *(per[s]["ns"] for s in shard_counts),
                *(per[s]["over_forwarded"] for s in shard_counts),
                per[shard_counts[-1]]["counted_as"],
            ]
        )
    return [harness.table("RelayRouter.client_datagram, ns a call (best run)", headers, lines)]


def main() -> None:
    args = parse()
    info = harness.machine()
    harness.pin(os.getpid(), harness.cores()[1])
    shard_counts = [int(s) for s in args.shards.split(",")]
    rows: list[dict[str, Any]] = []
    for shards in shard_counts:
        rows += measure(shards, args.flows, args.calls, args.reps)
    floor = loop_floor(args.calls, args.reps)
    worst = max((r for r in rows if "within" not in r["kind"]), key=lambda r: r["over_forwarded"])
    figures = {
        "parameters": vars(args),
        "loop_floor_ns": floor,
        "rows": rows,
        "worst_after_window": worst,
    }
    summary = (
        f"loop floor {floor:.0f} ns a call (in every figure). Worst past the adoption window: "
        f"{worst['kind']} at {worst['shards']} shards, {worst['over_forwarded']:.1f}x forwarded"
    )
    harness.report("router_junk", [*report_rows(rows, shard_counts), summary], figures, info)


if __name__ == "__main__":
    main()
