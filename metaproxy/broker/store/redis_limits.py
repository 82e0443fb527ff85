"""Tenant limits in the store: rates and in-flight caps that hold across the fleet."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from metaproxy.background import BackgroundTasks
from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import Admission, CacheClaim, CacheLook, StoreUnavailable
from metaproxy.broker.store.memory import LocalLimits, retry_after
from metaproxy.broker.store.redis_budget import RedisBudget
from metaproxy.broker.store.redis_keys import flight_keys, ms, short_digest, tenant_key
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.redis_registry import RedisRegistry
from metaproxy.models import BrokerLimits

# An in-flight slot is given back when its request ends; if its replica dies first, the lease
# frees it. Longer than any request the broker lets run.
IN_FLIGHT_LEASE_SECONDS = 30.0


class RedisLimits:
    def __init__(self, conn: StoreLink, registry: RedisRegistry) -> None:
        self._conn = conn
        self._registry = registry
        self._admit = conn.script(scripts.ADMIT)
        self._admit_and_claim = conn.script(scripts.ADMIT_AND_CLAIM)
        # A Cluster spreads a tenant's keys and a cache entry's keys over slots: no one script.
        self._claims_with_admission = conn.url.topology != "cluster"
        # The budget a claim that leads to an STS call may take a free slot of (see
        # ADMIT_AND_CLAIM): the store's budget, once the broker has asked for it.
        self.budget: RedisBudget | None = None
        self._local = LocalLimits()
        self._background = BackgroundTasks("in-flight slot given back")

    async def enter(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> Admission:
        ticket = secrets.token_hex(8)
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
            ticket,
            int(IN_FLIGHT_LEASE_SECONDS * 1_000_000),
        ]
        look: CacheLook | None = None
        budget = self.budget
        asked_at = asyncio.get_running_loop().time()
        try:
            if claim is not None and self._claims_with_admission:
                claim_keys = [*keys, *flight_keys(claim.key)]
                claim_args = [*args, claim.holder, ms(claim.ttl_seconds), "0"]
                if budget is not None:
                    timeline, interval_us, tolerance_us = budget.terms
                    claim_keys.append(timeline)
                    claim_args += [interval_us, tolerance_us]
                code, wait_us, value, taken, slot = await self._conn.run(
                    lambda: self._admit_and_claim(keys=claim_keys, args=claim_args)
                )
                look = CacheLook(value or None, bool(taken))
                if int(slot) and budget is not None:
                    budget.give(asked_at)
            else:
                code, wait_us = await self._conn.run(lambda: self._admit(keys=keys, args=args))
        except StoreUnavailable:
            share = 1 / max(1, self._registry.last_seen_live())
            admission = self._local.enter_now(tenant, subject, limits, share=share)
            if admission.admitted:
                return Admission(True, ticket="local:" + admission.ticket)
            return admission
        if int(code) == 0:
            return Admission(True, ticket=ticket, look=look)
        reason = {1: "tenant-rate", 2: "identity-rate"}.get(int(code), "in-flight")
        return Admission(False, reason, retry_after(int(wait_us) / 1_000_000))

    async def leave(self, tenant: str, ticket: str) -> None:
        if ticket.startswith("local:"):
            self._local.leave_now(tenant, ticket.removeprefix("local:"))
            return
        # Off the request's path: its answer need not wait for the slot to be given back. If
        # this fails the lease frees the slot (IN_FLIGHT_LEASE_SECONDS).
        self._background.spawn(self._give_back(tenant, ticket))

    async def _give_back(self, tenant: str, ticket: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._conn.run(
                lambda: self._conn.client.zrem(tenant_key(tenant, "in-flight"), ticket)
            )

    async def aclose(self) -> None:
        await self._background.aclose()
