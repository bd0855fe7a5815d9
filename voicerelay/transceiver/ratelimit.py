"""A token bucket per client (pure, driven with an injected monotonic `now`).

Signaling takes one token per `POST /v1/sessions` that is not made with the API key, and one per
refused credential anywhere: `rate` tokens a second refill each client's bucket up to `burst`.
A client is an IPv4 address or an IPv6 /64 (one subscriber's prefix). The table is bounded:
past `max_clients`, buckets that have refilled (they hold nothing) go first, then the least
recently used.
"""

from __future__ import annotations

import ipaddress
import math

DEFAULT_RATE = 2.0  # tokens a second: new sessions a second per client
DEFAULT_BURST = 20  # bucket size: how many at once
DEFAULT_MAX_CLIENTS = 65_536


def client_key(host: str | None) -> str:
    """The bucket a peer address falls in: the IPv4 address, or the IPv6 /64 prefix (an
    IPv4-mapped IPv6 address counts as its IPv4 address)."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"
    return str(ip)


class RateLimiter:
    """Token buckets keyed by client; `rate` 0 turns the limit off."""

    def __init__(self, rate: float, burst: int, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at); oldest first

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: 0.0 if granted, else the seconds until one is there."""
        if not self.enabled:
            return 0.0
        tokens = self._tokens(self._buckets.pop(key, None), now)
        granted = tokens >= 1.0
        if granted:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # (re)inserted last: the most recently used
        if len(self._buckets) > self.max_clients:
            self._shrink(now)
        return 0.0 if granted else (1.0 - tokens) / self.rate

    def _tokens(self, bucket: tuple[float, float] | None, now: float) -> float:
        if bucket is None:
            return float(self.burst)
        tokens, at = bucket
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate)

    def _shrink(self, now: float) -> None:
        """Back to at most 7/8 of `max_clients`: full buckets first, then the oldest."""
        target = self.max_clients - self.max_clients // 8
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if self._tokens(bucket, now) < self.burst
        }
        excess = len(self._buckets) - target
        if excess > 0:
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
