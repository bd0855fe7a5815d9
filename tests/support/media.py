"""A latency probe: a client that streams numbered packets through the relay to an echoing
stand-in transceiver and keeps, for every packet, when it was sent and when its echo came back.

It answers the questions recovery tests ask about a window of time: the longest silence (edges
included, so media that stops and never resumes counts), the round-trip times, the packets
whose echo never came.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from tests.support.procs import wait_for

_SEQ = struct.Struct("!I")


class Probe:
    """Streams `b"\\x80" + seq` every `interval` s; the stand-in echoes `b"E" + payload`."""

    def __init__(self, relay: tuple[str, int], interval: float = 0.01) -> None:
        self.relay = relay
        self.interval = interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.addr: tuple[str, int] = self.sock.getsockname()
        self.sent: list[float] = []  # sent[seq] = monotonic send time
        self.echoed: dict[int, float] = {}  # seq -> monotonic arrival time of its echo
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.relay)

    def start(self) -> Probe:
        self._threads = [
            threading.Thread(target=self._send_loop, daemon=True),
            threading.Thread(target=self._receive_loop, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        wait_for(lambda: len(self.echoed) >= 10, 5, what="the probe's first echoes")
        return self

    def _send_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self.lock:
                seq = len(self.sent)
                self.sent.append(time.monotonic())
            self.sock.sendto(b"\x80" + _SEQ.pack(seq), self.relay)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except (TimeoutError, OSError):
                continue
            if data.startswith(b"E\x80") and len(data) == 6:
                (seq,) = _SEQ.unpack_from(data, 2)
                with self.lock:
                    self.echoed.setdefault(seq, time.monotonic())

    # Questions about a window [since, until] ------------------------------------------------
    def echoes_after(self, t: float) -> int:
        with self.lock:
            return sum(1 for arrived in self.echoed.values() if arrived > t)

    def silence(self, since: float, until: float | None = None) -> float:
        """The longest stretch in [since, until] without an echo arriving (edges included)."""
        until = time.monotonic() if until is None else until
        with self.lock:
            times = sorted(t for t in self.echoed.values() if since <= t <= until)
        points = [since, *times, until]
        return max(b - a for a, b in zip(points, points[1:], strict=False))

    def round_trips(self, since: float, until: float) -> list[float]:
        """Round-trip times of the packets sent in [since, until] that came back."""
        with self.lock:
            return [
                self.echoed[seq] - sent
                for seq, sent in enumerate(self.sent)
                if since <= sent <= until and seq in self.echoed
            ]

    def lost(self, since: float, until: float, grace: float = 1.0) -> int:
        """Packets sent in [since, until] whose echo has not come `grace` s after `until`."""

        def missing() -> int:
            with self.lock:
                return sum(
                    1
                    for seq, sent in enumerate(self.sent)
                    if since <= sent <= until and seq not in self.echoed
                )

        deadline = max(time.monotonic(), until + grace)
        while missing() and time.monotonic() < deadline:  # late echoes still count
            time.sleep(0.01)
        return missing()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.sock.close()
