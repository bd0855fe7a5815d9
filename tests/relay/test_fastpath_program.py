"""The kernel fast path's program itself, loaded and attached for real (no relay process): what
it forwards, with which bytes and checksums, what it leaves to userspace, and its life cycle."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.fastpath import inside, udp_socket, unavailable
from tests.support.procs import free_ports
from voicerelay.relay.fastpath import FastPathUnavailable, layout, libbpf
from voicerelay.relay.fastpath.kernel import (
    HANDLE_BASE,
    PRIORITY,
    FastPathSettings,
    FlowMap,
    KernelFastPath,
)
from voicerelay.wire import envelope
from voicerelay.wire.addr import sockaddr

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
LO = "127.0.0.1"
SIZES = (1, 2, 3, 7, 160, 161, 511, 512, 513, 1023, 1399, 1400)  # one MTU with the envelope


class Bench:
    """A loaded program with sockets where its relay's would be, a transceiver and a client."""

    def __init__(self, tmp: Path, host: str = LO, peer_host: str = LO, peer_ns: str | None = None):
        port, internal = free_ports(1), free_ports(2)
        self.public = (host, port)
        self.internal = (host, internal)
        self.settings = FastPathSettings(self.public, host, range(internal, internal + 2))
        self.fast = KernelFastPath.start(self.settings, tmp / "fastpath")
        self.flows = FlowMap(self.fast.flows_fd)
        # What the relay's sockets would get: every packet the program leaves to userspace.
        self.public_sock = udp_socket(host, port)
        self.internal_sock = udp_socket(host, internal)
        self.client = udp_socket(peer_host, 0, peer_ns)
        self.transceiver = udp_socket(peer_host, 0, peer_ns)

    def offload(self, public_ip: bytes = bytes(4)) -> bytes:
        key = layout.flow_key(sockaddr(self.client.getsockname()))
        value = layout.flow_value(
            sockaddr(self.transceiver.getsockname()), sockaddr(self.internal), public_ip
        )
        self.flows.put(key, value)
        return key

    def close(self) -> None:
        self.fast.close()
        for sock in (self.public_sock, self.internal_sock, self.client, self.transceiver):
            sock.close()


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path)
    yield b
    b.close()


def test_an_offloaded_flow_is_forwarded_both_ways_with_its_envelope(bench):
    bench.offload()
    client = bench.client.getsockname()
    sizes = (*SIZES, 1499, 1500)  # loopback: no MTU below the largest datagram relayed
    for size in sizes:
        payload = bytes([0x80]) + bytes(range(256)) * 6
        bench.client.sendto(payload[:size], bench.public)
        data, source = bench.transceiver.recvfrom(4096)
        assert source == bench.internal
        assert envelope.unpack(data) == (client, payload[:size])
        reply = bytes([0x81]) + bytes(range(255, -1, -1)) * 6
        bench.transceiver.sendto(envelope.pack(client, reply[:size]), bench.internal)
        data, source = bench.client.recvfrom(4096)
        assert (data, source) == (reply[:size], bench.public)
    stats = bench.fast.stats()
    assert stats["to_transceiver"] == stats["to_client"] == len(sizes)
    assert stats["to_transceiver_bytes"] == stats["to_client_bytes"] == sum(sizes)
    reading = bench.flows.get(layout.flow_key(sockaddr(client)))
    assert (reading.packets_in, reading.packets_out) == (len(sizes), len(sizes))
    assert reading.bytes_in == reading.bytes_out == sum(sizes)
    assert 0 < reading.last_in_ns <= reading.last_out_ns


def _left_to_userspace(sock: socket.socket, expected: bytes) -> None:
    data, _ = sock.recvfrom(4096)
    assert data == expected


def test_what_is_not_an_established_flow_is_left_to_the_workers_and_counted(bench):
    key = bench.offload()
    client = bench.client.getsockname()
    cases = [  # (sender, to, datagram, where it lands unchanged, counted as)
        (bench.client, bench.public, b"\x00\x01stun-binding", bench.public_sock, "pass_kind"),
        (bench.client, bench.public, b"\x05zrtp", bench.public_sock, "pass_kind"),
        (bench.client, bench.public, b"\x80" * 1501, bench.public_sock, "pass_malformed"),
        (
            bench.transceiver,
            bench.internal,
            b"XX" + envelope.pack(client, b"\x80")[2:],
            bench.internal_sock,
            "pass_malformed",
        ),
        (
            bench.transceiver,
            bench.internal,
            envelope.pack(("198.51.100.1", 9), b"\x80x"),
            bench.internal_sock,
            "pass_no_flow",
        ),
        (
            bench.transceiver,
            bench.internal,
            envelope.pack(client, b"\x80" * 1501),
            bench.internal_sock,
            "pass_malformed",
        ),
    ]
    for sender, to, datagram, lands, _ in cases:
        sender.sendto(datagram, to)
        _left_to_userspace(lands, datagram)
    stranger = udp_socket(LO)  # not the flow's transceiver: its envelope is not trusted
    stranger.sendto(envelope.pack(client, b"\x80forged"), bench.internal)
    _left_to_userspace(bench.internal_sock, envelope.pack(client, b"\x80forged"))
    unknown = udp_socket(LO)  # no flow
    unknown.sendto(b"\x80media", bench.public)
    _left_to_userspace(bench.public_sock, b"\x80media")
    stats = bench.fast.stats()
    expected = {"pass_kind": 2, "pass_malformed": 3, "pass_no_flow": 2}
    expected["pass_wrong_transceiver"] = 1
    for name, count in expected.items():
        assert stats[name] == count, name
    assert stats["to_transceiver"] == stats["to_client"] == 0
    assert bench.flows.get(key).packets_in == 0
    stranger.close()
    unknown.close()


def test_a_program_not_renewed_forwards_nothing(bench):
    bench.offload()
    bench.fast.renew(alive_for=-1.0)  # what a launcher killed outright leaves: no renewals
    bench.client.sendto(b"\x80late", bench.public)
    _left_to_userspace(bench.public_sock, b"\x80late")
    assert bench.fast.stats()["pass_inert"] == 1
    bench.fast.renew()
    bench.client.sendto(b"\x80again", bench.public)
    data, _ = bench.transceiver.recvfrom(4096)
    assert data.endswith(b"\x80again")


def _attached(ifindex: int, port: int) -> int | None:
    return libbpf.tc_attached(ifindex, HANDLE_BASE + port, PRIORITY)


def test_a_relay_on_the_same_port_replaces_a_left_program_and_close_detaches_only_its_own(
    tmp_path,
):
    lo = socket.if_nametoindex("lo")
    port = free_ports(1)
    settings = FastPathSettings((LO, port), LO, range(port + 1, port + 2))
    left = KernelFastPath.start(settings, tmp_path)  # a launcher that died without closing
    first = _attached(lo, port)
    new = KernelFastPath.start(settings, tmp_path)
    second = _attached(lo, port)
    assert first and second and first != second
    left.close()  # the old one leaves the new one's program alone
    assert _attached(lo, port) == second
    new.close()
    assert _attached(lo, port) is None


def test_addresses_it_cannot_forward_say_so_in_one_line(tmp_path):
    for settings, words in (
        (FastPathSettings(("::1", 3478), "::1", range(1, 2)), "IPv4 only"),
        (FastPathSettings((LO, 3478), "0.0.0.0", range(1, 2)), "--internal-host"),
    ):
        with pytest.raises(FastPathUnavailable, match=words) as caught:
            KernelFastPath.start(settings, tmp_path)
        assert "\n" not in str(caught.value)


# Two hosts: the relay's (the root namespace's end of a veth pair, forwarding on for that link
# only) and a peer host (a namespace) holding both the client and the transceiver, whose
# packets carry full software checksums (offload off): the program's rewritten checksums are
# checked by the peer's stack, and its packets leave by redirect out of the veth.


def _snmp_udp(host: netns.ClientHost) -> dict[str, int]:
    lines = [
        ln.split()
        for ln in host.run(
            ["cat", "/proc/net/snmp"], capture_output=True, text=True
        ).stdout.splitlines()
        if ln.startswith("Udp:")
    ]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


@pytest.fixture
def two_hosts(tmp_path):
    with netns.ClientHost("10.79.3.0/24", "fd79:3::/64") as host:
        subprocess.run(["sysctl", "-qw", f"net.ipv4.conf.{host.host_if}.forwarding=1"], check=True)
        host.run(["ethtool", "-K", host.client_if, "tx", "off"], check=True, capture_output=True)
        bench = Bench(
            tmp_path,
            host=host.server_address(),
            peer_host=host.client_address(),
            peer_ns=host.name,
        )
        try:
            yield host, bench
        finally:
            bench.close()


def test_between_hosts_packets_leave_by_redirect_with_checksums_the_peer_accepts(two_hosts):
    host, bench = two_hosts
    assert "forwarding" not in " ".join(bench.fast.forwarding_off())
    bench.offload(socket.inet_aton(bench.public[0]))
    client = bench.client.getsockname()
    before = _snmp_udp(host)
    for size in SIZES:
        payload = bytes([0x90]) + bytes(range(1, 256)) * 6
        bench.client.sendto(payload[:size], bench.public)
        data, source = bench.transceiver.recvfrom(4096)
        assert (envelope.unpack(data), source) == ((client, payload[:size]), bench.internal)
        bench.transceiver.sendto(envelope.pack(client, payload[:size]), bench.internal)
        assert bench.client.recvfrom(4096) == (payload[:size], bench.public)
    after = _snmp_udp(host)
    assert after["InCsumErrors"] == before["InCsumErrors"]
    assert after["InDatagrams"] - before["InDatagrams"] == 2 * len(SIZES)
    stats = bench.fast.stats()
    assert stats["to_transceiver"] == stats["to_client"] == len(SIZES)


def test_a_checksum_offloaded_packet_that_would_leave_a_device_is_left_to_userspace(two_hosts):
    host, bench = two_hosts
    host.run(["ethtool", "-K", host.client_if, "tx", "on"], check=True, capture_output=True)
    bench.offload(socket.inet_aton(bench.public[0]))
    bench.client.sendto(b"\x80offloaded", bench.public)
    _left_to_userspace(bench.public_sock, b"\x80offloaded")
    assert bench.fast.stats()["pass_partial"] == 1


def test_inside_its_namespace_a_socket_stays_there(two_hosts):
    host, _ = two_hosts
    with inside(host.name):
        names = socket.if_nameindex()
    assert any(name == host.client_if for _, name in names)


def test_without_privileges_the_reason_is_one_line_naming_root():
    """The same start as an unprivileged user (setpriv: uid nobody, no capabilities)."""
    cache = Path(tempfile.mkdtemp(prefix="vr-fastpath-"))  # reachable by nobody
    cache.chmod(0o777)
    code = (
        "from pathlib import Path\n"
        "from voicerelay.relay.fastpath import FastPathUnavailable\n"
        "from voicerelay.relay.fastpath.kernel import FastPathSettings, KernelFastPath\n"
        "try:\n"
        f"    KernelFastPath.start(FastPathSettings(('{LO}', 3478), '{LO}', range(1, 2)), "
        f"Path('{cache}'))\n"
        "except FastPathUnavailable as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    shutil.rmtree(cache)
    assert done.stdout.strip() == (
        "loading an eBPF program needs root (CAP_BPF and CAP_NET_ADMIN)"
    ), done.stdout + done.stderr
