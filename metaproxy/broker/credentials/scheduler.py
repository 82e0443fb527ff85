"""Gets STS calls done: the bottom layer of the credential stack that waits.

Everything that decides *when* an AssumeRole call happens (fairness across tenants, cold starts
before refreshes, how many calls run at once, how fast) lives here; *how* one call is made
(budget, retries, regions, circuit) is `StsCaller`'s.

- `FairScheduler` is the broker's: `FairQueue` (per-tenant deficit round robin, cold before
  refresh, bounded), a `WorkerPool` sized by `autoscale.decide`, and `StsCaller`.
- `FixedPoolScheduler` (`fixed_pool.py`) is the design it replaced (20 workers, one FIFO
  queue, no bound), kept as the benchmark's baseline.

Both are `CredentialSource`s with nothing cached: `claim` asks nothing, `drop` has nothing to
drop (a queued job whose caller was cancelled by a revocation is skipped, its STS call stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Protocol

from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.credentials.autoscale import (
    Ewma,
    Load,
    RateMeter,
    ScaleLimits,
    WorkerPool,
    decide,
    wanted_workers,
)
from metaproxy.broker.credentials.caller import StsCaller
from metaproxy.broker.credentials.circuit import CircuitBreaker
from metaproxy.broker.credentials.fairqueue import FairQueue, QueueFull, RetrySlots
from metaproxy.broker.credentials.jobs import (
    Job,
    QueuedSource,
    SchedulerStats,
    await_job,
    settle,
)
from metaproxy.broker.credentials.source import Fetch, Fetched, Priority, Scope
from metaproxy.broker.credentials.sts import AssumedRole, StsClient
from metaproxy.broker.store.base import CacheClaim, StsBudget
from metaproxy.clock import SystemClock, WaitingClock
from metaproxy.errors import Overloaded, StsUnavailable
from metaproxy.models import AssumeRoleSpec

log = logging.getLogger("metaproxy.broker.scheduler")


class Scheduler(Protocol):
    """A credential source at the bottom of the stack, with a lifetime and its figures."""

    caller: StsCaller

    def claim(self, fetch: Fetch) -> CacheClaim | None: ...

    async def get(self, fetch: Fetch) -> Fetched: ...

    def release(self, fetch: Fetch) -> None: ...

    def drop(self, scope: Scope) -> int: ...

    def stats(self) -> SchedulerStats: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class FairScheduler(QueuedSource):
    """The broker's scheduler: fair bounded queue, autoscaled workers, budget, circuit."""

    def __init__(
        self,
        sts: StsClient,
        *,
        clock: WaitingClock | None = None,
        workers_min: int = 2,
        workers_max: int = 64,
        budget_per_second: float = 50.0,
        queue_max: int = 10_000,
        queue_per_tenant_max: int = 2_000,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
        failure_threshold: int = 5,
        cool_down: float = 5.0,
        scale_down_after: float = 30.0,
        tick_seconds: float = 0.25,
        budget: StsBudget | None = None,
    ) -> None:
        self._clock: WaitingClock = clock or SystemClock()
        self.caller = StsCaller(
            sts,
            budget_per_second=budget_per_second,
            breaker=lambda: CircuitBreaker(
                self._clock, failure_threshold=failure_threshold, cool_down=cool_down
            ),
            clock=self._clock,
            max_attempts=max_attempts,
            call_timeout=call_timeout,
            budget=budget,
        )
        self.queue: FairQueue[Job] = FairQueue(
            max_depth=queue_max, per_tenant_max=queue_per_tenant_max
        )
        self._retry_slots = RetrySlots()
        self.limits = ScaleLimits(
            workers_min=workers_min,
            workers_max=workers_max,
            budget_per_second=budget_per_second,
            scale_down_after=scale_down_after,
        )
        self._tick = tick_seconds
        self.pool: WorkerPool[Job] = WorkerPool(self._next_job, self._handle)
        self._available = asyncio.Event()
        self._claiming = 0  # workers waiting for a budget token before they pop
        self._arrivals = RateMeter()
        self._completions = RateMeter()
        self._item_seconds = Ewma(initial=0.2, time_constant=5.0)
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self.submitted = 0

    @classmethod
    def from_config(
        cls,
        config: BrokerConfig,
        sts: StsClient,
        clock: WaitingClock | None = None,
        budget: StsBudget | None = None,
    ) -> FairScheduler:
        return cls(
            sts,
            clock=clock,
            workers_min=config.workers_min,
            workers_max=config.workers_max,
            budget_per_second=config.sts_budget_per_second,
            queue_max=config.queue_max,
            queue_per_tenant_max=config.queue_per_tenant_max,
            max_attempts=config.sts_max_attempts,
            call_timeout=config.sts_timeout * 2,
            cool_down=config.sts_circuit_cool_down,
            budget=budget,
        )

    async def submit(self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority) -> AssumedRole:
        if self._closed:
            raise StsUnavailable("broker is shutting down")
        self._ensure_running()
        if self.caller.routes.rejects_now():
            # Fail fast: queueing would only make the caller wait for a call we will not make.
            self.caller.fast_failures += 1
            raise StsUnavailable("STS circuit open", retry_after=self.caller.circuit_retry_after())
        job = Job(spec, asyncio.get_running_loop().create_future())
        try:
            shed = self.queue.push(job, tenant=tenant, priority=priority)
        except QueueFull as full:
            full.retry_after = self._retry_slots.take(
                full.scope,
                now=self._clock.monotonic(),
                earliest=full.earliest,
                rate=self.queue.drain_rate,
            )
            raise
        self.submitted += 1
        self._arrivals.count(now=self._clock.monotonic())
        self._scale_up_now()
        if shed is not None and not shed.item.future.done():
            shed.item.future.set_exception(
                Overloaded("refresh pushed out of a full queue by a cold start")
            )
        self._available.set()
        return await await_job(job)

    async def start(self) -> None:
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self.pool.resize(self.limits.workers_min)
            # In a context of its own: started by a request, it would log that request's id,
            # tenant and task on every "STS workers a -> b" line ever after.
            self._supervisor = asyncio.create_task(
                self._autoscale(), name="sts-autoscaler", context=contextvars.Context()
            )

    def _scale_up_now(self) -> None:
        """Grow the pool on arrival when the backlog needs it: during a burst the event loop is
        busy admitting requests and the next autoscaler tick can come seconds late."""
        if self.pool.busy < self.pool.size:
            return  # an idle worker will take it
        load = Load(
            depth=len(self.queue),
            arrival_rate=self._arrivals.value,
            item_seconds=self._item_seconds.value,
            busy=self.pool.busy,
        )
        wanted = wanted_workers(load, self.limits)
        if wanted > self.pool.target:
            self.pool.resize(wanted)
            self._update_drain_rate(self._clock.monotonic())

    def _update_drain_rate(self, now: float) -> None:
        """What the queue will drain at: the pool as sized now, within the budget. The observed
        rate lags a burst by seconds, and would hand out far too long Retry-Afters."""
        capacity = self.pool.target / max(self._item_seconds.value, 1e-3)
        self.queue.drain_rate = max(
            self._completions.rate(now), min(capacity, self.limits.budget_per_second)
        )

    async def _next_job(self) -> Job:
        """Take a budget token first, then pop: the fair queue picks the item at the moment it
        can go to STS. Popping first parked up to `workers` items, picked by the fairness of
        earlier moments, in the limiter's FIFO queue, ahead of any cold start that arrived
        meanwhile. A worker only goes for a token while more items wait than workers are
        already going for one, so tokens are not taken for work that is not there."""
        while True:
            if len(self.queue) <= self._claiming:
                self._available.clear()
                await self._available.wait()
                continue
            self._claiming += 1
            try:
                await self.caller.take_budget()
            except asyncio.CancelledError:
                self._claiming -= 1
                self._available.set()  # a scaled-down claimant: another worker takes its turn
                raise
            self._claiming -= 1
            # Items whose caller gave up are skipped; the token then goes to the next one.
            while (entry := self.queue.pop()) is not None:
                if not entry.item.future.done():
                    return entry.item

    async def _handle(self, job: Job) -> None:
        started = self._clock.monotonic()
        await settle(job, self.caller, budget_taken=True)
        now = self._clock.monotonic()
        self._item_seconds.update(now - started, now)
        self._completions.count()

    async def _autoscale(self) -> None:
        low_since: float | None = None
        while True:
            await self._clock.sleep(self._tick)
            now = self._clock.monotonic()
            load = Load(
                depth=len(self.queue),
                arrival_rate=self._arrivals.rate(now),
                item_seconds=self._item_seconds.value,
                busy=self.pool.busy,
            )
            decision = decide(self.pool.target, load, self.limits, now=now, low_since=low_since)
            low_since = decision.low_since
            if decision.workers != self.pool.target:
                log.info(
                    "STS workers %d -> %d (queue %d, %.0f/s arriving, %.0f ms per item)",
                    self.pool.target,
                    decision.workers,
                    load.depth,
                    load.arrival_rate,
                    load.item_seconds * 1000,
                )
                self.pool.resize(decision.workers)
            self._update_drain_rate(now)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            queue_depth=len(self.queue),
            queue_cold=self.queue.depth("cold"),
            queue_refresh=self.queue.depth("refresh"),
            workers=self.pool.size,
            sts=self.caller.stats(),
            queue_tenants=self.queue.tenants(),
            queue_max=self.queue.max_depth,
            queue_rejected=self.queue.rejected,
            queue_shed=self.queue.shed,
            submitted=self.submitted,
            workers_target=self.pool.target,
            workers_busy=self.pool.busy,
            arrival_rate=self._arrivals.value,
            item_seconds=self._item_seconds.value,
        )

    async def aclose(self) -> None:
        """Stop the autoscaler and the workers; waiting callers get StsUnavailable."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self.pool.aclose()
        while (entry := self.queue.pop()) is not None:
            if not entry.item.future.done():
                entry.item.future.set_exception(StsUnavailable("broker is shutting down"))
