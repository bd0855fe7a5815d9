"""Two clusters on their own hosts (issue 13): a WebRTC client calls cluster 2's transceiver
through cluster 1's relay (the edge ingress), over the global hop; audio comes back, and the call
survives kill -9 of the edge worker carrying it, then a restart of the edge relay.

Hosts are network namespaces on one bridge (in a switch namespace of its own), 10.90.0.0/24:
edge (cluster 1: relay, 2 workers, and a transceiver), home (cluster 2: relay, 2 workers),
home-t (cluster 2's transceiver) and the client. Relays are configured the way the Kubernetes
manifests configure them, through VOICERELAY_* environment variables. The transceiver of
cluster 2 advertises the edge ingress (configuration). Nothing leaves the namespaces; they
and everything running in them are removed however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import netns
from tests.support.procs import RELAYCTL, free_ports, wait_for
from voicerelay.relay import control
from voicerelay.relay.config import RelayConfig

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

IP = netns.IP
HOSTS = {"edge": "10.90.0.1", "home": "10.90.0.2", "homet": "10.90.0.3", "client": "10.90.0.4"}
EDGE_CLUSTER, HOME_CLUSTER = 1, 2
TONE_SECONDS = 6.0
API_KEY = "multi-cluster-test-key-0123456789"


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Lan:
    """Namespaces joined by a bridge that lives in a switch namespace (nothing in the root's)."""

    def __init__(self, hosts: dict[str, str]) -> None:
        tag = os.getpid() % 100000
        self.switch = f"vr90sw{tag}"
        self.names = {host: f"vr90{host}{tag}" for host in hosts}
        self.hosts = hosts
        self.made: list[str] = []

    def create(self) -> Lan:
        _ip("netns", "add", self.switch)
        self.made.append(self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(self.hosts.items()):
            ns = self.names[host]
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.switch,
            )
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip(*sw, "link", "set", f"p{i}", "master", "br0", "up")
        return self

    def command(self, host: str, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.names[host], *argv]

    def destroy(self) -> None:
        for ns in reversed(self.made):
            out = subprocess.run(
                [IP, "netns", "pids", ns], capture_output=True, text=True, timeout=10
            ).stdout
            for pid in (int(p) for p in out.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", ns, check=False)


@contextlib.contextmanager
def lan() -> Iterator[Lan]:
    made = Lan(HOSTS)
    try:
        yield made.create()
    finally:
        made.destroy()


class Relay:
    """`relayctl start` inside a host, configured by environment variables."""

    def __init__(self, lan: Lan, host: str, state: Path, env: dict[str, str]) -> None:
        self.lan, self.host, self.state = lan, host, state
        self.port = free_ports(1)  # distinct shared-memory names for each relay on this machine
        state.mkdir()
        self.env = {
            **os.environ,
            "VOICERELAY_STATE_DIR": str(state),
            "VOICERELAY_LISTEN": f"{HOSTS[host]}:{self.port}",
            "VOICERELAY_INTERNAL": f"{HOSTS[host]}:{free_ports(2)}",
            "VOICERELAY_WORKERS": "2",
            "VOICERELAY_NO_PIN": "1",
            **env,
        }

    @property
    def address(self) -> str:
        return f"{HOSTS[self.host]}:{self.port}"

    def start(self) -> Relay:
        cmd = self.lan.command(self.host, [*RELAYCTL, "start"])
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(self.ready, 15, 0.05, f"{self.host} relay workers")
        return self

    def stats(self) -> dict[str, Any]:
        config = RelayConfig(
            listen_host=HOSTS[self.host], listen_port=self.port, state_dir=self.state
        )
        return control.request(config, "stats")

    def ready(self) -> bool:
        try:
            workers = self.stats()["workers"]
        except OSError:
            return False
        return all(w["alive"] for w in workers)

    def restart(self) -> None:
        """`relayctl restart`: a new launcher and workers take over the flows."""
        cmd = self.lan.command(self.host, [*RELAYCTL, "restart"])
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(self.ready, 15, 0.05, f"{self.host} relay workers after restart")

    def stop(self) -> None:
        cmd = self.lan.command(self.host, [*RELAYCTL, "stop"])
        subprocess.run(cmd, env=self.env, capture_output=True, timeout=30)


def transceiver(lan: Lan, host: str, cluster: int, ingress: str, relay_host: str, secret: Path):
    """`relayctl transceiver` inside `host`, advertising `ingress`, taking envelopes from the
    relay on `relay_host` only."""
    log = open(secret.parent / f"transceiver-{host}.log", "wb")  # noqa: SIM115 - lives with the process
    argv = [
        *RELAYCTL,
        "transceiver",
        "--internal",
        f"{HOSTS[host]}:6000",
        "--http",
        f"{HOSTS[host]}:8080",
        "--relay-public",
        ingress,
        "--relays",
        f"{HOSTS[relay_host]}/32",
        "--secret-file",
        str(secret),
        "--cluster-id",
        str(cluster),
        "--api-key",
        API_KEY,
    ]
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(secret.parent)}
    return subprocess.Popen(lan.command(host, argv), env=env, stdout=log, stderr=subprocess.STDOUT)


def http_ready(lan: Lan, url: str) -> bool:
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1)"
    cmd = lan.command("client", [RELAYCTL[0], "-c", probe])
    return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


def _carrying_worker(relay: Relay) -> dict[str, Any] | None:
    workers = relay.stats()["workers"]
    busy = [w for w in workers if w["counters"]["hops_out"] > 0 and w["counters"]["flows"]]
    return busy[0] if busy else None


def test_a_call_crosses_the_global_hop_and_survives_edge_kill_and_restart(tmp_path):
    with lan() as net:
        home_env = {
            "VOICERELAY_CLUSTER_ID": str(HOME_CLUSTER),
            "VOICERELAY_HOP_PEERS": "10.90.0.0/24",  # the edge relay's LAN
        }
        home = Relay(net, "home", tmp_path / "home", home_env)
        home.start()
        secret = home.state / "secret.key"
        edge = Relay(
            net,
            "edge",
            tmp_path / "edge",
            {
                "VOICERELAY_CLUSTER_ID": str(EDGE_CLUSTER),
                "VOICERELAY_SECRET_FILE": str(secret),
                "VOICERELAY_CLUSTER_ROUTES": f"{HOME_CLUSTER}={home.address}",
            },
        )
        edge.start()
        procs = [
            transceiver(net, "homet", HOME_CLUSTER, edge.address, "home", secret),
            transceiver(net, "edge", EDGE_CLUSTER, edge.address, "edge", secret),
        ]
        try:
            url = f"http://{HOSTS['homet']}:8080"
            wait_for(lambda: http_ready(net, url + "/healthz"), 20, 0.2, "cluster 2 signaling")
            argv = [
                *RELAYCTL,
                "call",
                url,
                "--seconds",
                str(TONE_SECONDS),
                "--json",
                "--token",
                API_KEY,
            ]
            call = subprocess.Popen(
                net.command("client", argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            wait_for(lambda: _carrying_worker(edge) is not None, 20, 0.05, "a hop flow at the edge")
            victim = _carrying_worker(edge)
            assert victim is not None
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: edge.ready() and _carrying_worker(edge), 10, 0.05, "the edge again")
            edge.restart()
            assert call.poll() is None, "the call ended before the edge restarted"
            out, err = call.communicate(timeout=60)
            assert call.returncode == 0, out.decode() + err.decode()
            report = json.loads(out)
            edge_stats, home_stats = edge.stats(), home.stats()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            edge.stop()
            home.stop()
    assert report["connected"] and abs(report["received_hz"] - report["tone_hz"]) <= 10.0
    print("audio", report["audio_seconds"], "s, longest gap", report["max_frame_gap_ms"], "ms")
    assert report["audio_seconds"] >= TONE_SECONDS - 2.0, report
    assert [report["candidates"][0][0], report["candidates"][0][1]] == [HOSTS["edge"], edge.port]
    assert victim["pid"] not in [w["pid"] for w in edge_stats["workers"]]
    assert edge_stats["totals"]["hops_out"] > 0  # the restarted edge forwarded the call too
    assert home_stats["totals"]["hops_in"] > 0 and home_stats["totals"]["hops_back"] > 0
