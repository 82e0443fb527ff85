"""Per-tenant request rate and in-flight caps, and a per-identity rate, from tenant policy.

A tenant flooding the broker (many identities, a loop) gets 429s; other tenants are measured
against their own buckets and do not notice. The counts live in the fleet store, so a tenant
gets the same rate and cap from 1 replica as from 12.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from metaproxy.broker.store.base import CacheClaim, CacheLook, TenantLimitStore
from metaproxy.errors import TooManyRequests
from metaproxy.models import BrokerLimits


class TenantLimiter:
    def __init__(self, store: TenantLimitStore) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def admit(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> AsyncIterator[CacheLook | None]:
        """Hold one admission for the block; it yields the shared cache's answer to `claim`
        when the store gave it with the admission (None: ask the cache)."""
        admission = await self._store.enter(tenant, subject, limits, claim)
        if not admission.admitted:
            detail = {
                "tenant-rate": f"tenant {tenant} over its rate",
                "identity-rate": f"identity {subject} over its rate",
            }.get(admission.reason, f"tenant {tenant} has too many requests in flight")
            raise TooManyRequests(detail, retry_after=admission.retry_after or 1.0)
        try:
            yield admission.look
        finally:
            await self._store.leave(tenant, admission.ticket)
