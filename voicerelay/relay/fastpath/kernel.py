"""The fast path as the kernel holds it: the launcher's `KernelFastPath` (load, attach, renew,
count, detach) and `FlowMap`, the flow map as a worker uses it (the map's descriptor is
inherited across the fork).

One relay's program is attached under a tc (handle, priority) derived from its public port: a
relay that starts on a port replaces whatever an earlier one on that port left attached, and a
relay that stops detaches its program only if it is still its own. A program that is left behind
anyway (a launcher killed outright) forwards nothing: the launcher renews the program's
`alive_until` every `RENEW` seconds, and past it every packet goes to userspace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from voicerelay.relay.fastpath import FastPathUnavailable, build, layout, libbpf

log = logging.getLogger("voicerelay.fastpath")

PROGRAM = "voicerelay_fastpath"
PRIORITY = 0xC0DE  # tc filter priority of every voicerelay program
HANDLE_BASE = 0x76720000  # + the public port: one filter per relay port
RENEW = 1.0  # s between renewals of the program's alive_until
ALIVE_FOR = 3.0  # s the program forwards after the last renewal


@dataclass(frozen=True)
class FastPathSettings:
    """Which datagrams are the relay's: to `public` (host, port), or to `internal_host` on one
    of `internal_ports` (the workers' internal sockets)."""

    public: tuple[str, int]
    internal_host: str
    internal_ports: range

    def check(self) -> None:
        """FastPathUnavailable (one line) unless the addresses suit the program (IPv4, and a
        concrete internal address, which the kernel sends from)."""
        for name, host in (("--listen", self.public[0]), ("--internal-host", self.internal_host)):
            if ipaddress.ip_address(host).version != 4:
                raise FastPathUnavailable(f"it forwards IPv4 only and {name} is {host}")
        if ipaddress.ip_address(self.internal_host).is_unspecified:
            raise FastPathUnavailable("it needs a concrete --internal-host, not 0.0.0.0")


def interfaces_for(settings: FastPathSettings) -> list[str]:
    """The interfaces the program watches: those holding the public or internal address (every
    IPv4 one for 0.0.0.0), and loopback (transceivers on this host answer through it)."""
    wanted = {settings.public[0], settings.internal_host}
    names = ["lo"]
    for name, addrs in psutil.net_if_addrs().items():
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        if ipv4 and name not in names and ("0.0.0.0" in wanted or wanted.intersection(ipv4)):
            names.append(name)
    return names


def local_ipv4_addresses() -> set[bytes]:
    """This host's (namespace's) IPv4 addresses, 4 bytes each."""
    return {
        socket.inet_aton(a.address)
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    }


def _reason(exc: libbpf.BpfError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "loading an eBPF program needs root (CAP_BPF and CAP_NET_ADMIN)"
    return str(exc.strerror or exc)


class KernelFastPath:
    """The loaded, attached program of one relay (the launcher's)."""

    def __init__(self, settings: FastPathSettings, obj: int, interfaces: list[str]) -> None:
        self.settings = settings
        self.obj = obj
        self.prog_fd = libbpf.program_fd(obj, PROGRAM)
        self.flows_fd = libbpf.map_fd(obj, "flows")
        self.config_fd = libbpf.map_fd(obj, "config")
        self.stats_fd = libbpf.map_fd(obj, "stats")
        self.local_fd = libbpf.map_fd(obj, "local_addresses")
        self.local: set[bytes] = set()  # what `local_addresses` holds
        self.handle = HANDLE_BASE + settings.public[1]
        self.interfaces = interfaces
        self.attached: dict[int, int] = {}  # ifindex -> our program's id there
        self.cpus = libbpf.possible_cpus()

    @classmethod
    def start(cls, settings: FastPathSettings, cache_dir: Path) -> KernelFastPath:
        """Build (if needed), load, configure and attach; FastPathUnavailable (one line)."""
        settings.check()
        path = build.object_file(cache_dir)
        try:
            obj = libbpf.open_and_load(str(path))
        except libbpf.BpfError as exc:
            raise FastPathUnavailable(_reason(exc)) from None
        fast = cls(settings, obj, interfaces_for(settings))
        try:
            fast.renew()
            for name in fast.interfaces:
                index = socket.if_nametoindex(name)
                fast.attached[index] = libbpf.tc_attach(index, fast.prog_fd, fast.handle, PRIORITY)
        except (libbpf.BpfError, OSError) as exc:
            fast.close()
            raise FastPathUnavailable(
                _reason(exc) if isinstance(exc, libbpf.BpfError) else str(exc)
            ) from None
        return fast

    def describe(self) -> str:
        return f"on ({', '.join(self.interfaces)})"

    def renew(self, now_ns: int | None = None, alive_for: float = ALIVE_FOR) -> None:
        """Keep the program forwarding for `alive_for` seconds more, with this host's current
        addresses (a packet to one of them is delivered here, not routed)."""
        if alive_for > 0:
            self._refresh_local_addresses()
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        s = self.settings
        value = layout.config_value(
            s.public[0],
            s.public[1],
            s.internal_host,
            s.internal_ports,
            now_ns + int(alive_for * 1e9),
        )
        libbpf.map_update(self.config_fd, bytes(4), value)

    def _refresh_local_addresses(self) -> None:
        now = local_ipv4_addresses()
        for gone in self.local - now:
            libbpf.map_delete(self.local_fd, gone)
        for new in now - self.local:
            libbpf.map_update(self.local_fd, new, b"\x01")
        self.local = now

    def forwarding_off(self) -> list[str]:
        """The watched interfaces (other than loopback) with IPv4 forwarding off: the kernel's
        FIB helper refuses to route packets arriving there, so flows whose peer is on another
        host stay in userspace (counted `pass_route`)."""
        off = []
        for name in self.interfaces:
            if name == "lo":
                continue
            try:
                value = Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").read_text().strip()
            except OSError:
                continue
            if value != "1":
                off.append(name)
        return off

    def stats(self) -> dict[str, int]:
        """What the program did, summed over CPUs (`layout.STAT_NAMES`)."""
        totals: dict[str, int] = {}
        for index, name in enumerate(layout.STAT_NAMES):
            raw = libbpf.map_lookup(self.stats_fd, index.to_bytes(4, "little"), 8 * self.cpus)
            totals[name] = (
                sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))
                if raw
                else 0
            )
        return totals

    def close(self) -> None:
        """Stop forwarding (inert at once), detach where the program is still ours, unload."""
        with contextlib.suppress(libbpf.BpfError):
            self.renew(alive_for=-1.0)
        for index, prog_id in self.attached.items():
            try:
                if libbpf.tc_attached(index, self.handle, PRIORITY) == prog_id:
                    libbpf.tc_detach(index, self.handle, PRIORITY)
            except libbpf.BpfError as exc:
                log.warning("detaching the fast path from interface %d failed: %s", index, exc)
        self.attached.clear()
        if self.obj:
            libbpf.close(self.obj)
            self.obj = 0


class FlowMap:
    """The kernel's flow map through an (inherited) descriptor: what a worker offloads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def put(self, key: bytes, value: bytes) -> None:
        libbpf.map_update(self.fd, key, value)

    def get(self, key: bytes) -> layout.FlowReading | None:
        raw = libbpf.map_lookup(self.fd, key, layout.FLOW_VALUE.size)
        return None if raw is None else layout.read_value(raw)

    def delete(self, key: bytes) -> bool:
        return libbpf.map_delete(self.fd, key)

    def items(self, internal_port: int | None = None) -> list[tuple[bytes, layout.FlowReading]]:
        """Every entry (only those sent from `internal_port`, when given: one worker's)."""
        raw = libbpf.map_items(self.fd, layout.FLOW_KEY.size, layout.FLOW_VALUE.size)
        if internal_port is not None:
            port = internal_port.to_bytes(2, "big")
            raw = [(k, v) for k, v in raw if v[6:8] == port]
        return [(key, layout.read_value(value)) for key, value in raw]
