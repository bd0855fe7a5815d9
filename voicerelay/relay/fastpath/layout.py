"""The fast path's map layouts (`program.bpf.c`'s structs) as bytes: pure, no kernel needed.

Addresses and ports travel in network byte order, as the packet headers carry them, so a key is
cut straight out of a `struct sockaddr_in`.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

FLOW_KEY = struct.Struct("=4s2s2x")  # client IP, client port
FLOW_VALUE = struct.Struct("=4s2s2s4s4s6Q")  # 64 bytes
CONFIG = struct.Struct("=4s2sHH2x4sQ")  # 24 bytes
COUNTERS_AT = 16  # offset of the kernel-written part of a flow value
STAT_NAMES = (
    "to_transceiver",
    "to_transceiver_bytes",
    "to_client",
    "to_client_bytes",
    "pass_kind",
    "pass_no_flow",
    "pass_wrong_transceiver",
    "pass_malformed",
    "pass_route",
    "pass_partial",
    "pass_inert",
    "failed",
)
_PORT = struct.Struct("!H")


def is_ipv4_sockaddr(raw: bytes) -> bool:
    """Is `raw` a `struct sockaddr_in` (the only kind the fast path forwards)?"""
    return len(raw) == 16 and struct.unpack_from("=H", raw)[0] == socket.AF_INET


def flow_key(client: bytes) -> bytes:
    """The map key of a client's `struct sockaddr_in`."""
    return FLOW_KEY.pack(client[4:8], client[2:4])


def address(ip_port: bytes) -> tuple[str, int]:
    """The address of 4 IP bytes followed by 2 port bytes (network order)."""
    return socket.inet_ntop(socket.AF_INET, ip_port[:4]), _PORT.unpack_from(ip_port, 4)[0]


def client_of_key(key: bytes) -> tuple[str, int]:
    """The client address a map key names."""
    return address(key[:6])


def flow_value(transceiver: bytes, internal: bytes, public_ip: bytes = bytes(4)) -> bytes:
    """A new flow's value: where its packets go (`transceiver` sockaddr_in), which worker's
    internal socket they leave from (`internal` sockaddr_in), the public IP replies leave
    from (zeros: learnt from the client's packets); counters zero."""
    return FLOW_VALUE.pack(
        transceiver[4:8],
        transceiver[2:4],
        internal[2:4],
        internal[4:8],
        public_ip,
        0,
        0,
        0,
        0,
        0,
        0,
    )


@dataclass(frozen=True, slots=True)
class FlowReading:
    """What the kernel recorded of one flow: where it goes, and what it forwarded."""

    transceiver: bytes  # IP (4) + port (2), network order
    internal_port: int
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    last_in_ns: int
    last_out_ns: int


def read_value(value: bytes) -> FlowReading:
    tip, tport, iport, _, _, pin, bin_, pout, bout, last_in, last_out = FLOW_VALUE.unpack(value)
    return FlowReading(
        tip + tport, _PORT.unpack(iport)[0], pin, bin_, pout, bout, last_in, last_out
    )


def config_value(
    public_ip: str, public_port: int, internal_ip: str, ports: range, alive_until_ns: int
) -> bytes:
    """The program's configuration: which datagrams are a relay's (to `public_ip`:`public_port`,
    0.0.0.0 for any local address; to `internal_ip` on one of `ports`), and until when the
    launcher vouches for them (CLOCK_MONOTONIC ns)."""
    return CONFIG.pack(
        socket.inet_aton(public_ip),
        _PORT.pack(public_port),
        ports.start,
        ports.stop - 1,
        socket.inet_aton(internal_ip),
        alive_until_ns,
    )
