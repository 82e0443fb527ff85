"""The STS budget in the store: one GCRA timeline for every replica's AssumeRole calls."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from dataclasses import dataclass

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import BudgetStats, StoreUnavailable
from metaproxy.broker.store.memory import LocalBudget
from metaproxy.broker.store.redis_keys import BUDGET_KEY
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.redis_registry import RedisRegistry

log = logging.getLogger("metaproxy.broker.store")

# The pump sleeps at most this long between asks (a slot further off is asked about again).
MAX_SLEEP_SECONDS = 0.25
# Kept back for the time between a slot and STS's count of the call (the replica's event loop,
# its connection to STS, the network): more than a single broker's call window keeps, because
# the slots of several replicas interleave and each replica's lateness adds to the others'
# (a 3,000-task burst over three replicas measured 308/s at the fault proxy with 5% kept back).
BUDGET_MARGIN = 0.06
# Calls that may go at once after a quiet spell, as a share of a second's budget. A slot is
# only ever taken when free now, so this is also how late a replica's event loop may wake
# without losing slots: at 0.02, a loop 20 ms late still takes every slot it was due. The
# busiest second at STS stays within 0.94 + 0.02 + 0.03 (late admission slots, budget.py) of
# the budget: 297 of 300, the room left for jitter on the way to STS under the 2% bound. At
# 0.05 one replica alone measured 308-331 calls in its busiest second at the fault proxy.
BUDGET_BURST_SHARE = 0.02
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
    """One GCRA timeline in the store for every replica's AssumeRole calls.

    This replica's calls queue here and one pump asks the store for a slot *free now* at a
    time, handing each to the longest waiter (who sends at once); told to wait, it sleeps until
    the next slot is due and asks again. Slots were once reserved up to 2 s ahead and dropped
    when the event loop woke their caller more than 40 ms late (a late call bunches with the
    calls on time after it); with the loop ~150 ms late under load, most reserved slots were
    dropped, each still spent on the shared timeline, and three replicas used 40% of a 500/s
    budget while their queues grew (bench/cold_start.py). A slot taken only when free now is
    never late and never wasted: a late pump asks late, and the timeline has not moved."""

    def __init__(self, conn: StoreLink, registry: RedisRegistry, calls: float) -> None:
        self.calls_per_second = calls
        self._conn = conn
        self._registry = registry
        self._reserve = conn.script(scripts.RESERVE_BUDGET)
        rate = calls * (1 - BUDGET_MARGIN)
        self._interval_us = int(1_000_000 / rate)
        self._tolerance_us = int(max(1.0, calls * BUDGET_BURST_SHARE) * self._interval_us)
        self._fallback: LocalBudget | None = None
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self.fallback_calls = 0
        self.asks = 0  # commands to the store, granted or told to wait

    @property
    def terms(self) -> BudgetTerms:
        return BudgetTerms(BUDGET_KEY, self._interval_us, self._tolerance_us)

    async def acquire(self) -> None:
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._pump is None or self._pump.done():
            # Its own context: the first caller's request id must not stick to its log lines.
            self._pump = asyncio.create_task(
                self._run(), name="sts-budget", context=contextvars.Context()
            )
        try:
            granted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._hand_on()  # a slot handed to a caller that left goes to the next one
            raise
        if not granted:  # the store has been down too long: this replica's share
            await self._local_share().acquire()
            self.fallback_calls += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        args = [self._interval_us, self._tolerance_us, 0]  # 0: only a slot free now
        while self._waiters:
            try:
                self.asks += 1
                wait_us = int(
                    await self._conn.run(lambda: self._reserve(keys=[BUDGET_KEY], args=args))
                )
            except StoreUnavailable:
                down_since = self._conn.down_since
                if down_since is not None and loop.time() - down_since >= FALLBACK_AFTER_SECONDS:
                    self._release_all(granted=False)
                    return
                await asyncio.sleep(0.1)
                continue
            if wait_us >= 0:
                self._hand_on()
            else:
                await asyncio.sleep(min(-wait_us / 1_000_000, MAX_SLEEP_SECONDS))

    def _hand_on(self) -> None:
        """The slot just taken goes to the longest waiter still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return

    def _release_all(self, *, granted: bool) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(granted)

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

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
            store_asks=self.asks,
        )
