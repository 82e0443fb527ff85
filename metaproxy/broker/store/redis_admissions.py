"""Admissions in the store: tenant rates and in-flight caps that hold across the fleet.

A cold request's admission also asks the shared cache its question and may take an STS budget
slot, in the same script (`ADMIT_AND_CLAIM`): one round trip where three would do. Both answers
come back in the admission's `Ticket`."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from metaproxy.background import BackgroundTasks
from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import (
    Admission,
    CacheClaim,
    CacheLook,
    StoreUnavailable,
    Ticket,
)
from metaproxy.broker.store.memory import LocalAdmissions, retry_after
from metaproxy.broker.store.redis_budget import BudgetTerms
from metaproxy.broker.store.redis_cache import Releases
from metaproxy.broker.store.redis_keys import flight_keys, ms, short_digest, tenant_key
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.redis_registry import RedisRegistry
from metaproxy.models import BrokerLimits

# An in-flight slot is given back when its request ends; if its replica dies first, the lease
# frees it. Longer than any request the broker lets run.
IN_FLIGHT_LEASE_SECONDS = 30.0
# A slot given back rides with this replica's next admission for the tenant (ADMIT gives it
# back before it counts), so a busy tenant costs one store command per request, not two. With
# no admission for the tenant within this, the ended requests' slots go back in one command.
# Until then the other replicas count them: a cap up to this much stricter, never looser.
RELEASE_AFTER_SECONDS = 0.05


class RedisAdmissions:
    def __init__(
        self, conn: StoreLink, registry: RedisRegistry, budget: BudgetTerms, releases: Releases
    ) -> None:
        self._conn = conn
        self._registry = registry
        self._admit = conn.script(scripts.ADMIT)
        self._admit_and_claim = conn.script(scripts.ADMIT_AND_CLAIM)
        # A Cluster spreads a tenant's keys and a cache entry's keys over slots: no one script.
        self._claims_with_admission = conn.url.topology != "cluster"
        # The budget a claim that leads to an STS call may take a free slot of.
        self._budget = budget
        self._releases = releases  # numbers the look a claim brings back (`CacheLook`)
        self._local = LocalAdmissions()
        self._ended: dict[str, list[str]] = {}  # tenant -> tickets of its requests that ended
        self._background = BackgroundTasks("in-flight slots given back")

    async def enter(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> Admission:
        slot = secrets.token_hex(8)
        released = self._ended.pop(tenant, [])
        t_interval = 1_000_000 / limits.requests_per_second
        i_interval = 1_000_000 / limits.per_identity_rps
        keys = [
            tenant_key(tenant, "rate"),
            tenant_key(tenant, "id:" + short_digest(subject)),
            tenant_key(tenant, "in-flight"),
        ]
        args: list[str | int] = [
            int(t_interval),
            int(t_interval * limits.burst),
            int(i_interval),
            int(i_interval * limits.per_identity_burst),
            limits.max_in_flight,
            slot,
            int(IN_FLIGHT_LEASE_SECONDS * 1_000_000),
            " ".join(released),
        ]
        look: CacheLook | None = None
        budget_due: float | None = None
        asked_at = asyncio.get_running_loop().time()
        releases_seen = self._releases.seen
        try:
            if claim is not None and self._claims_with_admission:
                claim_keys = [*keys, *flight_keys(claim.key), self._budget.timeline]
                claim_args = [
                    *args,
                    claim.holder,
                    ms(claim.ttl_seconds),
                    "0",
                    self._budget.interval_us,
                    self._budget.tolerance_us,
                ]
                code, wait_us, value, taken, budget_slot = await self._conn.run(
                    lambda: self._admit_and_claim(keys=claim_keys, args=claim_args)
                )
                look = CacheLook(value or None, bool(taken), releases_seen)
                budget_due = asked_at if int(budget_slot) else None
            else:
                code, wait_us = await self._conn.run(lambda: self._admit(keys=keys, args=args))
        except StoreUnavailable:
            for ended in released:
                self._release_later(tenant, ended)
            share = 1 / max(1, self._registry.last_seen_live())
            admission = self._local.enter_now(tenant, subject, limits, share=share)
            if admission.admitted:
                return Admission(True, ticket=Ticket("local:" + admission.ticket.slot))
            return admission
        if int(code) == 0:
            return Admission(True, ticket=Ticket(slot, look, budget_due))
        reason = {1: "tenant-rate", 2: "identity-rate"}.get(int(code), "in-flight")
        return Admission(False, reason, retry_after(int(wait_us) / 1_000_000))

    async def leave(self, tenant: str, ticket: Ticket) -> None:
        if ticket.slot.startswith("local:"):
            self._local.leave_now(tenant, ticket.slot.removeprefix("local:"))
            return
        # Off the request's path: its answer need not wait for the slot to be given back. If
        # that fails the lease frees the slot (IN_FLIGHT_LEASE_SECONDS).
        self._release_later(tenant, ticket.slot)

    def _release_later(self, tenant: str, ticket: str) -> None:
        ended = self._ended.get(tenant)
        if ended is None:
            self._ended[tenant] = [ticket]
            self._background.spawn(self._give_back_later(tenant))
        else:
            ended.append(ticket)

    async def _give_back_later(self, tenant: str) -> None:
        await asyncio.sleep(RELEASE_AFTER_SECONDS)
        await self._give_back(tenant)

    async def _give_back(self, tenant: str) -> None:
        """Give back the slots of the tenant's ended requests that no admission took along."""
        tickets = self._ended.pop(tenant, [])
        if not tickets:
            return
        with contextlib.suppress(StoreUnavailable):
            await self._conn.run(
                lambda: self._conn.client.zrem(tenant_key(tenant, "in-flight"), *tickets)
            )

    async def aclose(self) -> None:
        for tenant in list(self._ended):
            self._background.spawn(self._give_back(tenant))
        await self._background.aclose()
