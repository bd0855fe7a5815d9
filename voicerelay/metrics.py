"""Prometheus metrics, liveness and readiness for the relay and the transceiver.

Nothing here runs on a packet path. The relay's metrics are read at scrape time, in the
launcher, from what the workers already publish to shared memory (`launcher.stats()`); the
transceiver's gauges and counters are read at scrape time from its server, and its histograms
are observed on session events (secure, closed, an agent's first reply), never per packet.

`relay_families` and `transceiver_families` are pure: a stats dict and `now` in, metric
families out. `health_app` is the thin HTTP shell both use.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

# Relay ------------------------------------------------------------------------------------------
_DIRECTIONS = {"in": ("packets_in", "bytes_in"), "out": ("packets_out", "bytes_out")}
_DROP_PREFIX = "drop_"
_HOP_PREFIX = "hops_"  # the global hop's counters: hops_out, hops_in, hops_back


def relay_families(stats: Mapping[str, Any], now: float) -> list[Metric]:
    """The relay's metric families from a `Launcher.stats()` reply; `now` is wall time."""
    packets = CounterMetricFamily(
        "voicerelay_relay_packets", "Datagrams relayed", labels=["worker", "direction"]
    )
    octets = CounterMetricFamily(
        "voicerelay_relay_bytes", "Bytes relayed", labels=["worker", "direction"]
    )
    drops = CounterMetricFamily(
        "voicerelay_relay_drops", "Datagrams dropped, by reason", labels=["worker", "reason"]
    )
    flows = GaugeMetricFamily("voicerelay_relay_flows", "Flows a worker routes", labels=["worker"])
    restarts = CounterMetricFamily(
        "voicerelay_relay_worker_restarts", "Times a worker was forked again", labels=["worker"]
    )
    kernel_packets = CounterMetricFamily(
        "voicerelay_relay_kernel_packets",
        "Datagrams the kernel fast path forwarded for a worker's flows (included in "
        "voicerelay_relay_packets)",
        labels=["worker", "direction"],
    )
    kernel_flows = GaugeMetricFamily(
        "voicerelay_relay_kernel_flows",
        "Flows of a worker the kernel fast path forwards",
        labels=["worker"],
    )
    hops: dict[str, int] = {}
    for worker in stats.get("workers", ()):
        index = str(worker["index"])
        counters: Mapping[str, int] = worker.get("counters", {})
        for direction, (npackets, nbytes) in _DIRECTIONS.items():
            packets.add_metric([index, direction], counters.get(npackets, 0))
            octets.add_metric([index, direction], counters.get(nbytes, 0))
        for name, value in counters.items():
            if name.startswith(_DROP_PREFIX):
                drops.add_metric([index, name.removeprefix(_DROP_PREFIX)], value)
            elif name.startswith(_HOP_PREFIX):
                direction = name.removeprefix(_HOP_PREFIX)
                hops[direction] = hops.get(direction, 0) + value
        flows.add_metric([index], counters.get("flows", 0))
        restarts.add_metric([index], worker.get("restarts", 0))
        for direction in _DIRECTIONS:
            kernel_packets.add_metric(
                [index, direction], counters.get(f"kernel_packets_{direction}", 0)
            )
        kernel_flows.add_metric([index], counters.get("kernel_flows", 0))
    hop_family = CounterMetricFamily(
        "voicerelay_relay_hops",
        "Global-hop datagrams: out to another cluster, in from one, back to its client",
        labels=["direction"],
    )
    for direction, value in sorted(hops.items()):
        hop_family.add_metric([direction], value)
    snapshot: Mapping[str, Any] = stats.get("snapshot", {})
    age = GaugeMetricFamily(
        "voicerelay_relay_snapshot_age_seconds",
        "Seconds since the last good flow-table snapshot (since start if none yet)",
    )
    age.add_metric([], snapshot_age(snapshot, stats.get("uptime", 0.0), now))
    failures = CounterMetricFamily(
        "voicerelay_relay_snapshot_failures", "Flow-table snapshots that failed"
    )
    failures.add_metric([], snapshot.get("failures", 0))
    return [
        packets,
        octets,
        drops,
        flows,
        restarts,
        kernel_packets,
        kernel_flows,
        hop_family,
        age,
        failures,
    ]


def snapshot_age(snapshot: Mapping[str, Any], uptime: float, now: float) -> float:
    """Seconds since the last good snapshot (`last_ok`, wall time), else the uptime."""
    last_ok = snapshot.get("last_ok")
    return max(0.0, now - last_ok) if last_ok is not None else max(0.0, float(uptime))


def relay_ready(status: Mapping[str, Any]) -> bool:
    """Every worker of a `Launcher.status()` reply runs."""
    workers = status.get("workers", ())
    return bool(workers) and all(w.get("state") == "running" for w in workers)


# Transceiver ------------------------------------------------------------------------------------
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
JITTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
RTT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
TURN_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class CallHistograms:
    """The transceiver's histograms, each observed once per event (never per packet)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.setup = Histogram(
            "voicerelay_transceiver_setup_seconds",
            "Offer to DTLS up",
            buckets=SETUP_BUCKETS,
            registry=registry,
        )
        self.jitter = Histogram(
            "voicerelay_transceiver_jitter_seconds",
            "Interarrival jitter of received RTP, per closed call",
            buckets=JITTER_BUCKETS,
            registry=registry,
        )
        self.rtt = Histogram(
            "voicerelay_transceiver_rtt_seconds",
            "Round-trip time from RTCP, per closed call",
            buckets=RTT_BUCKETS,
            registry=registry,
        )
        self.agent_turn = Histogram(
            "voicerelay_transceiver_agent_turn_seconds",
            "End of the caller's turn to the agent's first reply audio",
            buckets=TURN_BUCKETS,
            registry=registry,
        )

    def call_closed(self, jitter: float | None, rtt: float | None) -> None:
        """A call ended: its final jitter and RTT (None or not finite: not measured)."""
        if jitter is not None and math.isfinite(jitter) and jitter >= 0:
            self.jitter.observe(jitter)
        if rtt is not None and math.isfinite(rtt) and rtt >= 0:
            self.rtt.observe(rtt)


def transceiver_families(stats: Mapping[str, Any]) -> list[Metric]:
    """Gauges and counters from a transceiver's `metrics_stats()` reply."""
    sessions = GaugeMetricFamily(
        "voicerelay_transceiver_sessions", "Sessions, by state", labels=["state"]
    )
    for state, count in sorted(stats.get("states", {}).items()):
        sessions.add_metric([str(state)], count)
    created = CounterMetricFamily("voicerelay_transceiver_sessions_created", "Sessions accepted")
    created.add_metric([], stats.get("created", 0))
    closed = CounterMetricFamily(
        "voicerelay_transceiver_sessions_closed", "Sessions ended, by reason", labels=["reason"]
    )
    for reason, count in sorted(stats.get("closed", {}).items()):
        closed.add_metric([str(reason)], count)
    lost = CounterMetricFamily("voicerelay_transceiver_rtp_lost", "RTP packets lost (received)")
    lost.add_metric([], stats.get("lost", 0))
    draining = GaugeMetricFamily(
        "voicerelay_transceiver_draining", "1 while draining (new sessions refused)"
    )
    draining.add_metric([], 1 if stats.get("draining") else 0)
    return [sessions, created, closed, lost, draining]


class FunctionCollector(Collector):
    """A collector whose families come from `families()` at each scrape."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)


# HTTP -------------------------------------------------------------------------------------------
async def metrics_response(registry: CollectorRegistry) -> web.Response:
    """GET /metrics: the registry in the text format."""
    response = web.Response(body=render(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def probe_response(ok: bool, why: str = "") -> web.Response:
    """A probe's answer: 200 "ok", or 503 with one line saying why."""
    if ok:
        return web.Response(text="ok\n")
    return web.Response(status=503, text=f"{why or 'not ready'}\n")


def health_app(registry: CollectorRegistry, ready: Callable[[], str | None]) -> web.Application:
    """/metrics, /healthz (200 while this process answers), /readyz (503 with the reason
    `ready()` returns, 200 when it returns None)."""

    async def get_metrics(request: web.Request) -> web.Response:
        return await metrics_response(registry)

    async def get_healthz(request: web.Request) -> web.Response:
        return probe_response(True)

    async def get_readyz(request: web.Request) -> web.Response:
        why = ready()
        return probe_response(why is None, why or "")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    return app


async def serve_health(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (port 0: any); returns the runner (`cleanup()` stops it)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def listening_sockets(runner: web.AppRunner) -> list[socket.socket]:
    """The sockets a runner's sites listen on."""
    out: list[socket.socket] = []
    for site in runner.sites:
        server = site._server  # type: ignore[attr-defined]
        if server is not None:
            out.extend(server.sockets)
    return out
