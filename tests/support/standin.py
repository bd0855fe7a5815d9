"""A stand-in transceiver (real UDP, speaking envelopes) and clients that open flows with a
sealed routing token, for testing the relay without the real transceiver."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict

from voicerelay.wire import envelope, stun
from voicerelay.wire.demux import IS_STUN
from voicerelay.wire.token import TokenKeys

Move = tuple[float, tuple[str, int], tuple[str, int] | None, tuple[str, int]]


def binding_request(
    keys: TokenKeys, transceiver: tuple[str, int], client_ufrag: str = "cli1"
) -> bytes:
    """A client's first packet: a STUN Binding request whose USERNAME routes to `transceiver`."""
    token = keys.seal(0, transceiver)
    return stun.build(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [(stun.ATTR_USERNAME, f"{token}:{client_ufrag}".encode())],
        integrity_key=b"not-checked-by-the-relay",
    )


class StandIn:
    """Receives envelopes in a thread; records (client, payload, relay worker); echoes on demand.

    With `echo=True`, every non-STUN payload is sent back to its client in an envelope, through
    the worker it came from, prefixed with b"E" (except to clients in `muted`: a transceiver
    that stopped answering them). `moves` logs (monotonic time, client, previous
    worker or None, new worker) each time a client's packets arrive through another worker.
    """

    def __init__(self, echo: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A burst through the relay arrives faster than this thread reads: buffer it as the
        # relay does, or the kernel drops what the relay delivered.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.echo = echo
        self.received: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        self.workers: dict[tuple[str, int], tuple[str, int]] = {}
        self.moves: list[Move] = []
        self.muted: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, worker = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            client, payload = envelope.unpack(data)
            with self.lock:
                self.received[client].append(payload)
                previous = self.workers.get(client)
                if previous != worker:
                    self.moves.append((time.monotonic(), client, previous, worker))
                self.workers[client] = worker
            if self.echo and payload and not IS_STUN[payload[0]] and client not in self.muted:
                self.sock.sendto(envelope.pack(client, b"E" + payload), worker)

    def reply(self, client: tuple[str, int], payload: bytes) -> None:
        """Send `payload` to `client` through the worker that last forwarded for it."""
        with self.lock:
            worker = self.workers[client]
        self.sock.sendto(envelope.pack(client, payload), worker)

    def got(self, client: tuple[str, int]) -> list[bytes]:
        with self.lock:
            return list(self.received.get(client, []))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class MediaClient:
    """A client socket that sends a packet every `interval` s and timestamps the echoes it gets."""

    def __init__(self, relay: tuple[str, int]) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.addr = self.sock.getsockname()
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.relay)

    def stream(self, interval: float = 0.02) -> MediaClient:
        """Start sending numbered RTP-like packets and recording echo arrival times."""

        def sender() -> None:
            n = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                self.sock.sendto(b"\x80" + n.to_bytes(4, "big"), self.relay)
                n += 1
                next_at += interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

        def receiver() -> None:
            while not self._stop.is_set():
                try:
                    data, _ = self.sock.recvfrom(2048)
                except (TimeoutError, OSError):
                    continue
                if data.startswith(b"E"):
                    self.arrivals.append(time.monotonic())

        self._threads = [
            threading.Thread(target=sender, daemon=True),
            threading.Thread(target=receiver, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def max_gap(self, since: float = 0.0) -> float:
        """The longest silence between consecutive echoes after `since`."""
        times = [t for t in self.arrivals if t >= since]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.sock.close()
