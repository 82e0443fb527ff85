"""The STS budget in the store: one GCRA timeline for every replica's AssumeRole calls."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from metaproxy.broker.credentials.budget import LATE_SLOT_SECONDS
from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import BudgetStats, StoreUnavailable
from metaproxy.broker.store.memory import LocalBudget
from metaproxy.broker.store.redis_keys import BUDGET_KEY
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.redis_registry import RedisRegistry

log = logging.getLogger("metaproxy.broker.store")

# Budget slots further ahead than this are not reserved (a worker scaled down while it waited
# would waste it): the caller waits a little and asks again.
MAX_RESERVE_AHEAD_SECONDS = 2.0
# Kept back for the time between a slot and STS's count of the call (the replica's event loop,
# its connection to STS, the network): more than a single broker's call window keeps, because
# the slots of several replicas interleave and each replica's lateness adds to the others'
# (a 3,000-task burst over three replicas measured 308/s at the fault proxy with 5% kept back).
BUDGET_MARGIN = 0.06
BUDGET_BURST_SHARE = 0.01  # calls that may go at once after a quiet spell, as a share of 1 s
# The budget falls back to this replica's share only once the store has been unreachable this
# long. A blip (a slow command under load) must not: the replica would spend its share on top
# of the other replicas' use of the whole budget. Until then its calls wait.
FALLBACK_AFTER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class BudgetTerms:
    """The budget's timeline and its spacing, for a script that takes a slot of it."""

    timeline: str
    interval_us: int
    tolerance_us: int


class RedisBudget:
    """One GCRA timeline in the store for every replica's AssumeRole calls."""

    def __init__(self, conn: StoreLink, registry: RedisRegistry, calls: float) -> None:
        self.calls_per_second = calls
        self._conn = conn
        self._registry = registry
        self._reserve = conn.script(scripts.RESERVE_BUDGET)
        rate = calls * (1 - BUDGET_MARGIN)
        self._interval_us = int(1_000_000 / rate)
        self._tolerance_us = int(max(1.0, calls * BUDGET_BURST_SHARE) * self._interval_us)
        self._fallback: LocalBudget | None = None
        self.fallback_calls = 0
        self.late_slots = 0

    @property
    def terms(self) -> BudgetTerms:
        return BudgetTerms(BUDGET_KEY, self._interval_us, self._tolerance_us)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked_at = loop.time()
            try:
                wait_us = await self._conn.run(
                    lambda: self._reserve(
                        keys=[BUDGET_KEY],
                        args=[
                            self._interval_us,
                            self._tolerance_us,
                            int(MAX_RESERVE_AHEAD_SECONDS * 1_000_000),
                        ],
                    )
                )
            except StoreUnavailable:
                down_since = self._conn.down_since
                if down_since is not None and loop.time() - down_since < FALLBACK_AFTER_SECONDS:
                    await asyncio.sleep(0.1)
                    continue
                await self._local_share().acquire()
                self.fallback_calls += 1
                return
            wait = int(wait_us) / 1_000_000
            if wait >= 0:
                slot = asked_at + wait  # at the latest: the store reserved it after we asked
                await asyncio.sleep(max(0.0, slot - loop.time()))
                if loop.time() - slot <= LATE_SLOT_SECONDS:
                    return
                # The event loop was busy past our slot (and past the slots of the calls it
                # held up with ours). Sent now, they would all reach STS at once, on top of the
                # other replicas' calls on time: 346 calls in one second of a 300/s budget, at
                # the fault proxy. A late slot is let go; a fresh one comes after the others.
                self.late_slots += 1
                continue
            await asyncio.sleep(min(-wait - MAX_RESERVE_AHEAD_SECONDS, 0.25) + 0.01)

    def _local_share(self) -> LocalBudget:
        """Budget ÷ the live replicas last seen, never above: every replica that lost the store
        does the same, so together they stay within the budget."""
        share = self.calls_per_second / max(1, self._registry.last_seen_live())
        if self._fallback is None or self._fallback.calls_per_second != share:
            log.warning("STS budget from the store unavailable: using %.1f/s (a share)", share)
            self._fallback = LocalBudget(share)
        return self._fallback

    def stats(self) -> BudgetStats:
        up = self._conn.up
        live = max(1, self._registry.last_seen_live())
        return BudgetStats(
            share_per_second=self.calls_per_second if up else self.calls_per_second / live,
            fallback=not up,
            fallback_calls=self.fallback_calls,
            late_slots=self.late_slots,
        )
