"""Other hosts for end-to-end tests: a client network namespace joined to the root namespace by
a veth pair, with IPv4 and IPv6 on both ends.

The stack under test binds the root end (`.1`, `::1`); clients run inside the namespace (`.2`,
`::2`) through `ip netns exec`. The namespace also gets a default route through a gateway that
does not exist (`.254`, `::fe`): browsers gather no candidates without a default route, and a
packet for any other address dies in the namespace instead of leaving it. Traffic stays on
addresses the test made.

Names carry the IPv4 prefix and the owner's pid, so tests with distinct prefixes run in any
order or at once; a second run of the same test waits for the first to release the prefix, and
a namespace left by a killed run (its owner dead) is removed before its prefix is used again.
Everything is removed on exit, also when the test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.support.procs import alive, wait_for

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"


def unavailable() -> str | None:
    """Why this machine cannot make client namespaces (one line), or None when it can."""
    if shutil.which(IP) is None:
        return "the `ip` command (Debian package iproute2) is missing"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`, output captured; RuntimeError with its message when it fails (`check`)."""
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def url_host(address: str) -> str:
    """`address` as it stands in a URL: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


class ClientHost:
    """A network namespace (the client's host) and a veth pair to the root namespace.

    `v4_net` is a /24 and `v6_net` a /64 that nothing else on the machine uses, such as
    "10.77.1.0/24" and "fd77:1::/64".
    """

    def __init__(self, v4_net: str, v6_net: str, *, owner_wait: float = 60.0) -> None:
        v4 = ipaddress.IPv4Network(v4_net)
        v6 = ipaddress.IPv6Network(v6_net)
        if v4.prefixlen != 24 or v6.prefixlen != 64:
            raise ValueError(f"give a /24 and a /64, not {v4_net} and {v6_net}")
        self.v4_net, self.v6_net = v4, v6
        octets = str(v4.network_address).split(".")
        self._tag = f"{octets[1]}-{octets[2]}"
        self.name = f"vrt-{self._tag}-{os.getpid()}"
        self.host_if = f"vr{octets[1]}x{octets[2]}h"  # at most 10 characters (limit 15)
        self.client_if = f"vr{octets[1]}x{octets[2]}c"
        self.owner_wait = owner_wait  # how long another live run may hold this prefix
        self.created = False

    # -- addresses -----------------------------------------------------------------------

    def server_address(self, family: int = socket.AF_INET) -> str:
        """The root end's address: what the stack binds and advertises."""
        return str(self._net(family).network_address + 1)

    def client_address(self, family: int = socket.AF_INET) -> str:
        """The client end's address, inside the namespace."""
        return str(self._net(family).network_address + 2)

    def _gateway(self, family: int) -> str:
        return str(self._net(family).network_address + (254 if family == socket.AF_INET else 0xFE))

    def _net(self, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if family == socket.AF_INET:
            return self.v4_net
        if family == socket.AF_INET6:
            return self.v6_net
        raise ValueError(f"family {family} is neither AF_INET nor AF_INET6")

    # -- running things inside -----------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command that runs inside the namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace."""
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen inside the namespace."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def wrapper(self, executable: str, path: Path) -> Path:
        """A script at `path` that execs `executable` inside the namespace with its arguments
        (for launchers that take an executable path, such as Playwright's)."""
        path.write_text(f'#!/bin/sh\nexec {IP} netns exec {self.name} {executable} "$@"\n')
        path.chmod(0o755)
        return path

    def pids(self) -> list[int]:
        """Processes running inside the namespace."""
        out = run_ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    # -- life cycle ----------------------------------------------------------------------

    def create(self) -> ClientHost:
        """Make the namespace, the veth pair, the addresses and the default routes."""
        self._remove_leftovers()
        self.created = True
        run_ip("netns", "add", self.name)
        peer = ("peer", "name", self.client_if, "netns", self.name)
        run_ip("link", "add", self.host_if, "type", "veth", *peer)
        ns = ("-n", self.name)
        for family, prefix in ((socket.AF_INET, 24), (socket.AF_INET6, 64)):
            extra = ("nodad",) if family == socket.AF_INET6 else ()
            server, client = self.server_address(family), self.client_address(family)
            run_ip("addr", "add", f"{server}/{prefix}", "dev", self.host_if, *extra)
            run_ip(*ns, "addr", "add", f"{client}/{prefix}", "dev", self.client_if, *extra)
        run_ip("link", "set", self.host_if, "up")
        run_ip(*ns, "link", "set", "lo", "up")
        run_ip(*ns, "link", "set", self.client_if, "up")
        run_ip(*ns, "route", "add", "default", "via", self._gateway(socket.AF_INET))
        gateway6 = self._gateway(socket.AF_INET6)
        run_ip(*ns, "-6", "route", "add", "default", "via", gateway6, "dev", self.client_if)
        return self

    def destroy(self) -> None:
        """Stop whatever still runs inside, then remove the veth pair and the namespace."""
        if not self.created:
            return
        _remove(self.name, self.host_if)
        self.created = False

    def _remove_leftovers(self) -> None:
        """Remove a namespace of this prefix whose owner is dead. One whose owner lives (the
        same test in another run) is waited for, `owner_wait` seconds at most."""
        deadline = time.monotonic() + self.owner_wait
        while held := self._held_by_others():
            if time.monotonic() > deadline:
                name, owner = held[0]
                raise RuntimeError(
                    f"{self.v4_net} is in use by namespace {name} of running process {owner}"
                )
            time.sleep(0.1)
        for name, _ in self._namespaces_of_prefix():
            _remove(name, self.host_if)
        if run_ip("link", "show", self.host_if, check=False).returncode == 0:
            run_ip("link", "del", self.host_if)

    def _namespaces_of_prefix(self) -> list[tuple[str, int]]:
        """(name, owner pid) of every namespace made for this prefix."""
        pattern = re.compile(rf"vrt-{re.escape(self._tag)}-(\d+)$")
        found = []
        for line in run_ip("netns", "list").stdout.splitlines():
            match = pattern.match(line.split()[0]) if line.strip() else None
            if match:
                found.append((match.group(0), int(match.group(1))))
        return found

    def _held_by_others(self) -> list[tuple[str, int]]:
        return [
            (name, owner)
            for name, owner in self._namespaces_of_prefix()
            if owner != os.getpid() and alive(owner)
        ]

    def __enter__(self) -> ClientHost:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _remove(name: str, host_if: str) -> None:
    """Delete `host_if` (both ends go) and namespace `name` with what runs inside."""
    remove_namespace(name, before_delete=lambda: run_ip("link", "del", host_if, check=False))


def remove_namespace(name: str, before_delete: Callable[[], object] | None = None) -> None:
    """Kill the processes in namespace `name` (waiting until they are gone), then delete it
    (calling `before_delete` first, if given)."""
    for pid in run_ip("netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    wait_for(
        lambda: not run_ip("netns", "pids", name, check=False).stdout.split(),
        10,
        0.02,
        f"the processes in namespace {name} to end",
    )
    if before_delete is not None:
        before_delete()
    run_ip("netns", "del", name, check=False)
