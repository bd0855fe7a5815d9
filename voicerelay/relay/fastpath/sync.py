"""A worker's bridge between its router and the kernel's flow map (I/O only: every decision is
the router's).

- `apply`: carry out the router's puts and deletes (a delete only of an entry this worker owns:
  another worker may have taken the client over);
- `poll`: take in what the kernel forwarded for this worker's entries, and delete entries of
  this worker that its router no longer offloads;
- `start`: a restarted worker takes up the entries its previous incarnation left.

Entries belong to a worker by the internal port they send from.
"""

from __future__ import annotations

import logging

from voicerelay.relay.fastpath import layout
from voicerelay.relay.fastpath.kernel import FlowMap
from voicerelay.relay.fastpath.libbpf import BpfError
from voicerelay.relay.router import RelayRouter

log = logging.getLogger("voicerelay.fastpath")

POLL_EVERY = 1.0  # s between readings of the kernel's counters


def _counts(reading: layout.FlowReading) -> tuple[int, int, int, int]:
    return reading.packets_in, reading.bytes_in, reading.packets_out, reading.bytes_out


class KernelSync:
    """Keeps the kernel's entries for one worker in step with its router."""

    def __init__(self, flows: FlowMap, router: RelayRouter, internal: bytes, public_ip: bytes):
        """`internal`: the worker's internal socket (sockaddr_in); `public_ip`: the address
        replies leave from (4 zero bytes: learnt from the client's packets)."""
        self.flows = flows
        self.router = router
        self.internal = internal
        self.internal_port = int.from_bytes(internal[2:4], "big")
        self.public_ip = public_ip
        self.polled_at = float("-inf")
        self.failures = 0

    def start(self, now: float) -> int:
        """Take up this worker's entries (a restarted worker's); delete those its shard no
        longer holds. The number taken up."""
        taken = 0
        for key, reading in self._items():
            client = layout.client_of_key(key)
            if self.router.adopt_offloaded(key, client, _counts(reading), now):
                taken += 1
            else:
                self._delete(key)
        return taken

    def apply(self) -> None:
        for key, flow in self.router.take_kernel_ops():
            try:
                if flow is None:
                    self._delete(key)
                else:
                    value = layout.flow_value(flow.transceiver_peer, self.internal, self.public_ip)
                    self.flows.put(key, value)
            except BpfError as exc:  # a full map: the flow stays in userspace
                self._failed(exc)

    def poll(self, now: float) -> None:
        """Every `POLL_EVERY`: the kernel's counters into the router."""
        if now - self.polled_at < POLL_EVERY:
            return
        self.polled_at = now
        router = self.router
        for key, reading in self._items():
            last_out = reading.last_out_ns / 1e9
            if not router.kernel_activity(key, _counts(reading), last_out, now):
                self._delete(key)

    def _delete(self, key: bytes) -> None:
        """Delete the entry under `key` if it is still this worker's."""
        try:
            current = self.flows.get(key)
            if current is not None and current.internal_port == self.internal_port:
                self.flows.delete(key)
        except BpfError as exc:
            self._failed(exc)

    def _items(self) -> list[tuple[bytes, layout.FlowReading]]:
        """This worker's entries."""
        try:
            return self.flows.items(self.internal_port)
        except BpfError as exc:
            self._failed(exc)
            return []

    def _failed(self, exc: BpfError) -> None:
        self.failures += 1
        if self.failures in (1, 10, 100, 1000):
            log.warning("kernel flow map: %s (%d failures so far)", exc, self.failures)
