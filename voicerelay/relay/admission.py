"""Who may open a new flow at a relay worker: token buckets per source prefix (sans-IO).

A prefix is what one network controls: a /24 for IPv4 (IPv4-mapped IPv6 included), a /64 for
IPv6. Each bucket admits `rate` new flows a second, up to `burst` at once. Buckets live in one
worker (the kernel spreads a prefix's sources over workers, so a relay admits up to `workers`
times as many). Memory is bounded: a refilled bucket is the same as none, so `prune` forgets
those; at `max_prefixes` the oldest bucket is forgotten (its prefix starts over with a full
burst: the table fails open to strangers rather than closed to everyone).
"""

from __future__ import annotations

from itertools import islice

from voicerelay.wire.addr import V4_MAPPED_PREFIX, Addr, pack_ip

MAX_PREFIXES = 65536


def prefix_of(client: Addr) -> bytes:
    """The source prefix a client's new flows are counted under (/24 IPv4, /64 IPv6)."""
    _, ip16 = pack_ip(client[0])
    if ip16[:12] == V4_MAPPED_PREFIX:
        return b"4" + ip16[12:15]
    return b"6" + ip16[:8]


class PrefixLimiter:
    """A token bucket per source prefix; `rate` 0 admits everything."""

    def __init__(self, rate: float, burst: int, max_prefixes: int = MAX_PREFIXES) -> None:
        if rate < 0 or burst < 1 or max_prefixes < 1:
            raise ValueError("rate must be >= 0, burst and max_prefixes >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_prefixes = max_prefixes
        self._buckets: dict[bytes, list[float]] = {}  # prefix -> [level, when]

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)

    def allows(self, prefix: bytes, now: float) -> bool:
        """Would a new flow from `prefix` be admitted now? (Takes nothing.)"""
        bucket = self._buckets.get(prefix)
        return self.rate == 0 or bucket is None or self._level(bucket, now) >= 1.0

    def take(self, prefix: bytes, now: float) -> bool:
        """Admit one new flow from `prefix` if its bucket holds one; False if it is empty."""
        if self.rate == 0:
            return True
        bucket = self._buckets.get(prefix)
        if bucket is not None:
            level = self._level(bucket, now)
            if level < 1.0:
                return False
            bucket[0], bucket[1] = level - 1.0, now
            return True
        if len(self._buckets) >= self.max_prefixes:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[prefix] = [self.burst - 1.0, now]
        return True

    def prune(self, now: float, budget: int) -> int:
        """Forget up to `budget` refilled buckets, oldest first (a bucket still refilling
        moves to the back); returns how many were forgotten."""
        forgotten = 0
        for prefix in list(islice(self._buckets, budget)):
            bucket = self._buckets.pop(prefix)
            if self._level(bucket, now) < self.burst:
                self._buckets[prefix] = bucket
            else:
                forgotten += 1
        return forgotten
