"""The fast path's map layouts (pure): keys and values round-trip, and match the C structs."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from voicerelay.relay.fastpath import layout
from voicerelay.wire.addr import sockaddr

ipv4 = st.ip_addresses(v=4).map(str)
ports = st.integers(1, 65535)
PROGRAM = Path(layout.__file__).with_name("program.bpf.c").read_text()


@given(ipv4, ports)
def test_a_key_names_the_client_it_was_cut_from(host, port):
    key = layout.flow_key(sockaddr((host, port)))
    assert len(key) == layout.FLOW_KEY.size == 8
    assert layout.client_of_key(key) == (host, port)


@given(ipv4, ports, ipv4, ports, ipv4)
def test_a_new_value_reads_back_with_zero_counters(thost, tport, ihost, iport, public):
    value = layout.flow_value(
        sockaddr((thost, tport)), sockaddr((ihost, iport)), socket.inet_aton(public)
    )
    assert len(value) == layout.FLOW_VALUE.size == 64
    reading = layout.read_value(value)
    assert reading.transceiver == socket.inet_aton(thost) + tport.to_bytes(2, "big")
    assert reading.internal_port == iport
    assert (reading.packets_in, reading.bytes_in, reading.packets_out, reading.bytes_out) == (
        0,
        0,
        0,
        0,
    )
    assert value[8:12] == socket.inet_aton(ihost) and value[12:16] == socket.inet_aton(public)


@given(ipv4, ports, ipv4, st.integers(1, 60000), st.integers(1, 16), st.integers(0, 2**63))
def test_config_carries_the_port_range_inclusive(public, port, internal, base, count, alive):
    raw = layout.config_value(public, port, internal, range(base, base + count), alive)
    assert len(raw) == layout.CONFIG.size == 24
    ip, port_be, lo, hi, internal_ip, until = layout.CONFIG.unpack(raw)
    assert (lo, hi) == (base, base + count - 1)
    assert int.from_bytes(port_be, "big") == port and until == alive
    assert ip == socket.inet_aton(public) and internal_ip == socket.inet_aton(internal)


def test_only_ipv4_sockaddrs_are_offloadable():
    assert layout.is_ipv4_sockaddr(sockaddr(("192.0.2.1", 9)))
    assert not layout.is_ipv4_sockaddr(sockaddr(("192.0.2.1", 9), socket.AF_INET6))
    assert not layout.is_ipv4_sockaddr(sockaddr(("2001:db8::1", 9), socket.AF_INET6))


def test_the_stat_names_follow_the_program_enum():
    body = PROGRAM[PROGRAM.index("enum stat {") : PROGRAM.index("STAT_COUNT")]
    names = [m.lower() for m in re.findall(r"STAT_([A-Z_]+)", body)]
    assert tuple(names) == layout.STAT_NAMES
