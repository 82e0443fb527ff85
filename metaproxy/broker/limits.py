"""Per-tenant request rate and in-flight caps, and a per-identity rate, from tenant policy.

A tenant flooding the broker (many identities, a loop) gets 429s; other tenants are measured
against their own buckets and do not notice.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator

from metaproxy.errors import TooManyRequests
from metaproxy.models import BrokerLimits
from metaproxy.ratelimit import KeyedLimiter


class TenantLimiter:
    def __init__(self) -> None:
        defaults = BrokerLimits()
        self._tenant_rate = KeyedLimiter(defaults.requests_per_second, defaults.burst)
        self._identity_rate = KeyedLimiter(
            defaults.per_identity_rps, defaults.per_identity_burst, max_keys=100_000
        )
        self._in_flight: defaultdict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def admit(self, tenant: str, subject: str, limits: BrokerLimits) -> Iterator[None]:
        wait = self._tenant_rate.take(tenant, rate=limits.requests_per_second, burst=limits.burst)
        if wait:
            raise TooManyRequests(f"tenant {tenant} over its rate", retry_after=_ceil(wait))
        wait = self._identity_rate.take(
            (tenant, subject), rate=limits.per_identity_rps, burst=limits.per_identity_burst
        )
        if wait:
            raise TooManyRequests(f"identity {subject} over its rate", retry_after=_ceil(wait))
        if self._in_flight[tenant] >= limits.max_in_flight:
            raise TooManyRequests(f"tenant {tenant} has too many requests in flight")
        self._in_flight[tenant] += 1
        try:
            yield
        finally:
            self._in_flight[tenant] -= 1


def _ceil(seconds: float) -> float:
    return float(max(1, math.ceil(seconds)))
