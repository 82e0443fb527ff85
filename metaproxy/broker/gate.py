"""The fleet's gate: per-tenant request rate and in-flight caps, and a per-identity rate.

A tenant flooding the broker (many identities, a loop) gets 429s; other tenants are measured
against their own buckets and do not notice. The counts live in the fleet store, so a tenant
gets the same rate and cap from 1 replica as from 12.

An admitted request holds a `Ticket` for its duration. A cold request's ticket may also carry
the shared cache's answer and an STS budget slot, taken by the store in the same round trip as
the admission; the credential stack's layers read them (`credentials/source.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from metaproxy.broker.store.base import AdmissionStore, CacheClaim, Ticket
from metaproxy.errors import TooManyRequests
from metaproxy.models import BrokerLimits


class FleetGate:
    def __init__(self, store: AdmissionStore) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def admit(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold one admission for the block, or raise `TooManyRequests`. `claim`: the question
        the credential stack will ask the fleet's cache first, asked along with the admission."""
        admission = await self._store.enter(tenant, subject, limits, claim)
        if not admission.admitted:
            detail = {
                "tenant-rate": f"tenant {tenant} over its rate",
                "identity-rate": f"identity {subject} over its rate",
            }.get(admission.reason, f"tenant {tenant} has too many requests in flight")
            raise TooManyRequests(detail, retry_after=admission.retry_after or 1.0)
        try:
            yield admission.ticket
        finally:
            await self._store.leave(tenant, admission.ticket)
