"""What a stack binds and what its answers advertise: the pure rules and one small shell.

Binding and advertising are separate: a process may bind a wildcard (`0.0.0.0`, `::`), but an
answer must name addresses a client can send to. The rules here refuse, in one line naming the
option, an advertised address that is a wildcard, not a unicast address, or that the relay's
bind cannot receive (`check_advertised`). `advertisable` picks, from a list of interfaces, the
addresses `relayctl up` advertises when told nothing (every up, non-loopback interface's
unicast addresses); `host_interfaces` is the only code here that asks the operating system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from voicerelay.config import ConfigError

IPV4_LOOPBACK = "127.0.0.1"
IPV6_LOOPBACK = "::1"
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Interface:
    """One network interface as the operating system reports it."""

    name: str
    up: bool
    addresses: tuple[str, ...]  # IPv4 and IPv6 literals; link-local ones may carry `%scope`


def ip(host: str) -> IpAddress | None:
    """`host` as an address (an IPv6 `%scope` suffix dropped), or None if it is not one."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None


def canonical(host: str) -> str:
    """An address literal in its one written form (IPv6 compressed); `host` if not one."""
    address = ip(host)
    return str(address) if address is not None else host


def format_addr(addr: tuple[str, int]) -> str:
    """`host:port`, an IPv6 host in brackets (`[::1]:3478`)."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or :: (bind to every address; never something to send to)."""
    address = ip(host)
    return address is not None and address.is_unspecified


def is_loopback(host: str) -> bool:
    address = ip(host)
    return address is not None and address.is_loopback


def loopback_of(host: str) -> str:
    """The loopback address of `host`'s family."""
    address = ip(host)
    return IPV6_LOOPBACK if address is not None and address.version == 6 else IPV4_LOOPBACK


def _unusable_reason(address: IpAddress) -> str | None:
    """Why clients cannot be sent to `address`, or None if they can."""
    if address.is_unspecified:
        return "is a wildcard, not an address clients can reach"
    if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        return "is not a unicast address"
    if address.is_link_local:
        return "is link-local (it needs an interface scope answers cannot carry)"
    return None


def _is_candidate(host: str) -> bool:
    """Would `relayctl up` advertise this interface address by itself?"""
    address = ip(host)
    return (
        address is not None
        and not address.is_loopback
        and _unusable_reason(address) is None
        and not (address.version == 6 and address.ipv4_mapped is not None)
    )


def advertisable(interfaces: Iterable[Interface]) -> list[str]:
    """The addresses clients on other hosts (or browsers that ignore loopback) can use: every
    unicast, non-loopback, non-link-local address of an interface that is up; IPv4 first,
    then IPv6, each in interface order, no repeats."""
    found: list[str] = []
    for interface in interfaces:
        if interface.up:
            found += [canonical(a) for a in interface.addresses if _is_candidate(a)]
    unique = list(dict.fromkeys(found))
    return [a for a in unique if ":" not in a] + [a for a in unique if ":" in a]


def check_advertised(host: str, relay_bind: str | None, option: str = "--advertise") -> str:
    """`host` in canonical form if clients can send to it and a relay bound to `relay_bind`
    (None: unknown, another process) receives what they send; else a one-line ConfigError
    naming `option` and the fix."""
    address = ip(host)
    if address is None or "%" in host:
        raise ConfigError(
            f"{option} {host!r} is not an IP address: write a literal such as 192.0.2.10 "
            "or 2001:db8::10"
        )
    reason = _unusable_reason(address)
    if reason is not None:
        raise ConfigError(
            f"{option} {host} {reason}: name an address clients reach the relay at "
            "(e.g. this host's LAN address)"
        )
    if relay_bind is None:
        return str(address)
    bound = ip(relay_bind)
    if bound is None:
        raise ConfigError(f"the relay's bind address {relay_bind!r} is not an IP address")
    if bound.version == 4 and address.version == 6:
        raise ConfigError(
            f"{option} {address} is IPv6 but the relay binds IPv4 {bound}: "
            "bind it to :: (--relay-bind ::) or advertise an IPv4 address"
        )
    if bound.version == 6 and address.version == 4 and not bound.is_unspecified:
        raise ConfigError(
            f"{option} {address} is IPv4 but the relay binds IPv6 {bound}: "
            "bind it to :: (--relay-bind ::) or advertise an IPv6 address"
        )
    if bound.is_loopback and address != bound:
        raise ConfigError(
            f"{option} {address} cannot reach the relay bound to loopback {bound}: "
            f"bind it where clients arrive (--relay-bind {address}, or a wildcard)"
        )
    if address.is_loopback and not bound.is_unspecified and address != bound:
        raise ConfigError(
            f"{option} {address} is loopback but the relay binds {bound}: "
            f"advertise {bound} or bind the relay to a wildcard"
        )
    return str(address)


def parse_advertise(
    entries: str | Iterable[str], relay_bind: str | None, option: str = "--advertise"
) -> tuple[str, ...]:
    """A comma-separated list (or several values) of advertised addresses, each checked by
    `check_advertised`, in order, repeats dropped; a one-line ConfigError if it is empty."""
    if isinstance(entries, str):
        entries = [entries]
    hosts = [h.strip() for entry in entries for h in entry.split(",") if h.strip()]
    if not hosts:
        raise ConfigError(f"{option} is empty: name at least one address, e.g. 192.0.2.10")
    return tuple(dict.fromkeys(check_advertised(h, relay_bind, option) for h in hosts))


def check_bind(host: str, option: str) -> str:
    """`host` in canonical form if a socket can bind it (an address or a wildcard); else a
    one-line ConfigError naming `option`."""
    address = ip(host)
    if address is None or "%" in host:
        raise ConfigError(
            f"{option} {host!r} is not an IP address: give a literal such as 127.0.0.1 or ::1"
        )
    if address.is_multicast:
        raise ConfigError(f"{option} {host} is a multicast address: bind a unicast address")
    return str(address)


@dataclass(frozen=True)
class AddressPlan:
    """Where each part of a one-host stack binds, and what its answers advertise."""

    http: str  # signaling and the page
    internal: str  # the transceiver's and the relay workers' internal sockets
    relay_bind: str  # the relay's public UDP socket
    advertise: tuple[str, ...]  # the relay addresses answers list as candidates, in order
    detected: bool = False  # `advertise` came from this host's interfaces


def plan_addresses(
    *,
    bind: str | None,
    relay_bind: str | None,
    advertise: str | Iterable[str] | None,
    interfaces: Callable[[], Iterable[Interface]],
    dual_stack: bool,
) -> AddressPlan:
    """`relayctl up`'s addresses from its options (None: not given).

    Given none of them, signaling and the internal sockets stay on 127.0.0.1, the relay's UDP
    binds the wildcard (`::` where IPv4 arrives on IPv6 sockets, else `0.0.0.0`) and answers
    advertise 127.0.0.1 and every address of `interfaces()` that `advertisable` keeps (IPv4
    only without dual stack): browsers that skip loopback candidates, such as Firefox, reach
    the relay on the same machine. Otherwise `bind` (default 127.0.0.1) is where everything
    binds, the relay's UDP at `relay_bind` if given, and answers advertise `advertise`, by
    default the relay's bind address unless that is a wildcard, which is refused in one line
    naming --advertise. `interfaces` is only asked in the default case
    and for that line's hint.
    """
    if bind is None and relay_bind is None and advertise is None:
        found = advertisable(interfaces())
        if not dual_stack:
            found = [a for a in found if ":" not in a]
        wildcard = "::" if dual_stack else "0.0.0.0"
        everything = (IPV4_LOOPBACK, *found)
        return AddressPlan(IPV4_LOOPBACK, IPV4_LOOPBACK, wildcard, everything, detected=True)
    bind = check_bind(bind or IPV4_LOOPBACK, "--bind")
    relay_bind = check_bind(relay_bind, "--relay-bind") if relay_bind else bind
    if advertise is None:
        if is_wildcard(relay_bind):
            hint = ", ".join(advertisable(interfaces())[:4])
            raise ConfigError(
                f"the relay binds the wildcard {relay_bind}, which answers cannot name: "
                "list the addresses clients reach with --advertise"
                + (f" (this host has {hint})" if hint else "")
            )
        advertise = relay_bind
    internal = loopback_of(bind) if is_wildcard(bind) else bind
    return AddressPlan(bind, internal, relay_bind, parse_advertise(advertise, relay_bind))


# The shell ------------------------------------------------------------------------------------
def host_interfaces() -> list[Interface]:
    """This host's interfaces, their state and addresses (psutil)."""
    import socket

    import psutil

    stats = psutil.net_if_stats()
    out = []
    for name, entries in psutil.net_if_addrs().items():
        families = (socket.AF_INET, socket.AF_INET6)
        addresses = tuple(e.address for e in entries if e.family in families)
        state = stats.get(name)
        out.append(Interface(name, bool(state and state.isup), addresses))
    return out


def ipv4_arrives_on_ipv6_sockets(setting: Path = Path("/proc/sys/net/ipv6/bindv6only")) -> bool:
    """Does a socket bound to `::` also receive IPv4 here (Linux: net.ipv6.bindv6only = 0)?"""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        return setting.read_text().strip() == "0"
    except OSError:
        return False
