"""Reject-fast token buckets keyed by client, tenant or identity.

aiolimiter (used for the STS budget) makes callers *wait* for capacity; here excess must be
refused at once and cheaply — a client in a tight loop gets 429 + Retry-After, never a queue
slot — so this is a synchronous bucket with no awaits and no per-request allocation.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 if allowed, else the seconds until `cost` tokens will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        if self.rate <= 0:
            return 60.0
        return (cost - self.tokens) / self.rate


class KeyedLimiter:
    """One bucket per key, the least recently used forgotten past `max_keys` (bounded memory)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._monotonic = monotonic
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def take(self, key: object, *, rate: float | None = None, burst: float | None = None) -> float:
        """0.0 if the request may go ahead, else a Retry-After in seconds."""
        now = self._monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            limit_burst = self.burst if burst is None else burst
            bucket = TokenBucket(rate or self.rate, limit_burst, limit_burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            if rate is not None:
                bucket.rate = rate
            if burst is not None:
                bucket.burst = burst
        return bucket.take(now)
