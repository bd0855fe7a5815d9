"""A small reorder (jitter) buffer for one RTP stream, sans-IO: packets in with their arrival
time, frames out strictly in sequence order, lost ones marked for concealment.

- The first packet sets the expected sequence number. 16-bit sequence numbers are extended
  relative to the expected one (so wraparound at 65535 is seamless).
- In-order packets go straight out: the buffer adds no delay while nothing is missing.
- A gap waits until `wait` seconds after the earliest arrival of a packet beyond it; then it is
  released as lost frames (at most `max_conceal` per gap: the ones just before the packet that
  ended it, the rest are skipped with no output). A lost frame carries the next packet's
  payload when that one is already here, so the decoder can rebuild it from in-band FEC.
- A packet behind the expected one is late (dropped); a second copy of a buffered one is a
  duplicate (dropped).
- Resync: a packet `max_packets` or more ahead of the expected one (the sender jumped) drops
  what is buffered (counted `flushed`: those packets sit behind a gap and would be out of date)
  and restarts from that packet. Two consecutive packets (n, n+1) each `max_packets` or more
  behind the expected one (the sender restarted its numbering lower) resync the same way, on
  the second of them; a single stray old packet is only late.
At most `max_packets` packets are ever buffered.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


@dataclass(frozen=True)
class JitterFrame:
    """One frame released in sequence order."""

    seq: int  # extended sequence number (monotonic, unwrapped)
    timestamp: int  # RTP timestamp (for lost frames: previous + frame_samples per step)
    payload: bytes | None  # None: this frame was lost (conceal it)
    following: bytes | None  # for a lost frame: the next packet's payload if buffered (FEC)


@dataclass(frozen=True)
class _Packet:
    timestamp: int
    payload: bytes
    arrival: float


class JitterBuffer:
    """Reorders one stream's packets and releases losses after a short wait."""

    def __init__(
        self,
        *,
        wait: float = 0.04,
        max_packets: int = 50,
        max_conceal: int = 10,
        frame_samples: int = 960,
    ) -> None:
        if wait < 0 or max_packets < 1 or max_conceal < 0 or frame_samples < 1:
            raise ValueError(
                "jitter buffer: wait >= 0, max_packets >= 1, max_conceal >= 0, frame_samples >= 1"
            )
        self.wait = wait
        self.max_packets = max_packets
        self.max_conceal = max_conceal
        self.frame_samples = frame_samples
        self._packets: dict[int, _Packet] = {}  # extended seq -> packet
        self._expected: int | None = None  # extended seq of the next frame to release
        self._last: tuple[int, int] | None = None  # (seq, timestamp) last released
        self._behind: int | None = None  # 16-bit seq of the last far-behind packet
        self.counters: dict[str, int] = {
            "received": 0,
            "duplicates": 0,
            "late": 0,
            "lost": 0,
            "resyncs": 0,
            "skipped": 0,
            "flushed": 0,
        }

    def __len__(self) -> int:
        return len(self._packets)

    # Packets in ----------------------------------------------------------------------------
    def push(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """One packet (16-bit RTP sequence number) arrived at `now`."""
        if not 0 <= seq < SEQ_MOD:
            raise ValueError(f"RTP sequence number {seq} is not 16-bit")
        self.counters["received"] += 1
        packet = _Packet(timestamp % TS_MOD, payload, now)
        if self._expected is None:
            self._restart(seq, packet)
            return
        ext = self._extend(seq)
        distance = ext - self._expected
        if distance >= self.max_packets:
            self._resync(seq, packet)
        elif distance < 0:
            self._behind_expected(seq, packet, distance)
        elif ext in self._packets:
            self.counters["duplicates"] += 1
        else:
            self._behind = None
            self._packets[ext] = packet

    def _extend(self, seq: int) -> int:
        """The extended sequence number nearest the expected one."""
        assert self._expected is not None
        delta = (seq - self._expected) % SEQ_MOD
        if delta >= SEQ_MOD // 2:
            delta -= SEQ_MOD
        return self._expected + delta

    def _behind_expected(self, seq: int, packet: _Packet, distance: int) -> None:
        """Late, unless it is the second of two consecutive far-behind packets."""
        far = distance <= -self.max_packets
        if far and self._behind is not None and (self._behind + 1) % SEQ_MOD == seq:
            self._resync(seq, packet)
            return
        self._behind = seq if far else None
        self.counters["late"] += 1

    def _resync(self, seq: int, packet: _Packet) -> None:
        self.counters["resyncs"] += 1
        self.counters["flushed"] += len(self._packets)
        self._restart(seq, packet)

    def _restart(self, seq: int, packet: _Packet) -> None:
        """Start again from this packet; extended numbers stay increasing across restarts."""
        ext = seq
        if self._expected is not None:
            ext = self._extend(seq)
            if ext < self._expected:  # numbering restarted lower: move on a whole cycle
                ext += -(-(self._expected - ext) // SEQ_MOD) * SEQ_MOD
        self._packets = {ext: packet}
        self._expected = ext
        self._behind = None

    # Frames out ---------------------------------------------------------------------------
    def deadline(self) -> float | None:
        """When pop() would release the next lost frame; None if nothing waits on a gap."""
        if self._expected is None:
            return None
        run_end = self._expected
        while run_end in self._packets:
            run_end += 1
        beyond = [p.arrival for s, p in self._packets.items() if s > run_end]
        return min(beyond) + self.wait if beyond else None

    def pop(self, now: float) -> list[JitterFrame]:
        """Frames ready at `now`, strictly in sequence order."""
        out: list[JitterFrame] = []
        packets = self._packets
        while packets and self._expected is not None:
            packet = packets.pop(self._expected, None)
            if packet is not None:
                out.append(JitterFrame(self._expected, packet.timestamp, packet.payload, None))
                self._last = (self._expected, packet.timestamp)
                self._expected += 1
                continue
            if now < min(p.arrival for p in packets.values()) + self.wait:
                break
            self._release_gap(out)
        return out

    def _release_gap(self, out: list[JitterFrame]) -> None:
        """The gap before the next buffered packet: its last `max_conceal` frames as lost."""
        assert self._expected is not None
        next_seq = min(self._packets)
        following = self._packets[next_seq]
        skip = max(0, next_seq - self._expected - self.max_conceal)
        self.counters["skipped"] += skip
        for seq in range(self._expected + skip, next_seq):
            self.counters["lost"] += 1
            timestamp = self._lost_timestamp(seq, next_seq, following.timestamp)
            fec = following.payload if seq + 1 == next_seq else None
            out.append(JitterFrame(seq, timestamp, None, fec))
            self._last = (seq, timestamp)
        self._expected = next_seq

    def _lost_timestamp(self, seq: int, next_seq: int, next_timestamp: int) -> int:
        if self._last is not None:
            last_seq, last_ts = self._last
            return (last_ts + (seq - last_seq) * self.frame_samples) % TS_MOD
        return (next_timestamp - (next_seq - seq) * self.frame_samples) % TS_MOD
