"""Gets STS calls done: fair bounded queue, autoscaled workers, the global STS call budget,
retries with backoff, and a circuit breaker.

`StsScheduler` is the seam between the issuer and STS. Everything that decides *when* an
AssumeRole call happens (fairness across tenants, cold starts before refreshes, how many calls
run at once, how fast) lives behind it.

- `FairScheduler` is the broker's: `FairQueue` (per-tenant deficit round robin, cold before
  refresh, bounded), a `WorkerPool` sized by `autoscale.decide`, and `StsCaller`.
- `FixedPoolScheduler` is the design we replace (20 workers, one FIFO queue, no bound), kept
  as the benchmark's baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from metaproxy.broker.autoscale import (
    Ewma,
    Load,
    RateMeter,
    ScaleLimits,
    WorkerPool,
    decide,
    wanted_workers,
)
from metaproxy.broker.budget import CallWindow
from metaproxy.broker.circuit import STATE_CODES, CircuitBreaker
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.fairqueue import FairQueue, Priority, QueueFull, RetrySlots
from metaproxy.broker.regions import RegionRoutes, Route
from metaproxy.broker.store.base import StsBudget
from metaproxy.broker.store.memory import LocalBudget
from metaproxy.broker.sts import AssumedRole, StsClient, StsThrottled
from metaproxy.clock import Clock, SystemClock
from metaproxy.errors import MetaproxyError, Overloaded, StsUnavailable, UpstreamError
from metaproxy.models import AssumeRoleSpec, Credentials

log = logging.getLogger("metaproxy.broker.scheduler")

__all__ = ["FairScheduler", "FixedPoolScheduler", "Priority", "StsCaller", "StsScheduler"]


class StsScheduler(Protocol):
    async def submit(
        self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority
    ) -> AssumedRole: ...

    def stats(self) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


def full_jitter_backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """AWS's "full jitter": uniform over [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto


class StsCaller:
    """One AssumeRole, with retries: each attempt inside the budget, timed out, and counted.

    `sts` may be a `RegionalSts`: each attempt then goes to the first region whose circuit lets
    it through (`regions.py`); `breaker` makes one circuit per region."""

    def __init__(
        self,
        sts: StsClient,
        *,
        budget_per_second: float,
        breaker: Callable[[], CircuitBreaker],
        clock: Clock,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        budget: StsBudget | None = None,
    ) -> None:
        self.routes = RegionRoutes(sts, breaker)
        self.budget_per_second = budget_per_second
        # Paces calls within the budget (the fleet's, when the store is shared); the call
        # window below is this process's hard cap at the moment of sending.
        self._budget: StsBudget = budget or LocalBudget(budget_per_second)
        self._window = CallWindow.for_budget(budget_per_second)
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._call_timeout = call_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self.latency = Ewma(initial=0.2, time_constant=5.0)
        self.calls = 0
        self.ok = 0
        self.throttles = 0
        self.errors = 0
        self.timeouts = 0
        self.refused = 0  # 4xx from STS: UpstreamError, not retried
        self.fast_failures = 0  # failed by the open circuit without calling STS

    def circuit_retry_after(self) -> float:
        return max(1.0, self.routes.retry_after())

    async def take_budget(self) -> None:
        """Wait for one call's worth of the budget (for a caller that picks its work after)."""
        await self._budget.acquire()

    async def assume_role(self, spec: AssumeRoleSpec, *, budget_taken: bool = False) -> AssumedRole:
        """`budget_taken`: the caller already holds the token for the first attempt."""
        if spec.via is None:
            return await self._call(spec, budget_taken=budget_taken)
        # Role chaining: two calls, each within the budget and retried on its own; the second
        # is signed with the first's credentials (a retry of the second reuses them).
        first = await self._call(spec.via, budget_taken=budget_taken)
        final = await self._call(spec, signed_with=first.credentials)
        return dataclasses.replace(
            final,
            via_assumed_role_arn=first.assumed_role_arn,
            via_access_key_id=first.credentials.access_key_id,
        )

    async def _call(
        self,
        spec: AssumeRoleSpec,
        *,
        budget_taken: bool = False,
        signed_with: Credentials | None = None,
    ) -> AssumedRole:
        error: MetaproxyError = StsUnavailable("AssumeRole not attempted")
        failed_region: str | None = None
        for attempt in range(self._max_attempts):
            route = self.routes.pick(avoid=failed_region)
            if route is None:
                self.fast_failures += 1
                raise StsUnavailable(
                    "STS circuit open; not calling", retry_after=self.circuit_retry_after()
                )
            if attempt or not budget_taken:
                await self._budget.acquire()
            outcome = await self._attempt(route, spec, signed_with)
            if isinstance(outcome, AssumedRole):
                return outcome
            error = outcome
            if isinstance(error, UpstreamError) or attempt + 1 == self._max_attempts:
                break
            # A region that did not answer: the retry goes to another one, if any will take it.
            is_down = isinstance(error, StsUnavailable) and not isinstance(error, StsThrottled)
            failed_region = route.region if is_down else None
            await asyncio.sleep(
                full_jitter_backoff(attempt, base=self._backoff_base, cap=self._backoff_cap)
            )
        raise error

    async def _attempt(
        self, route: Route, spec: AssumeRoleSpec, signed_with: Credentials | None
    ) -> AssumedRole | MetaproxyError:
        """Make one call and return its outcome as a value (errors included)."""
        self.calls += 1
        started = self._clock.monotonic()
        outcome: AssumedRole | MetaproxyError
        slot = await self._window.admit()
        try:
            # Inline, not wait_for: wait_for would start the call as a new task, one event-loop
            # turn later, and a turn can be long on a busy broker.
            async with asyncio.timeout(self._call_timeout):
                outcome = await route.client.assume_role(
                    spec, signed_with=signed_with, on_sent=slot.sent
                )
        except TimeoutError:
            self.timeouts += 1
            outcome = StsUnavailable(
                f"AssumeRole {spec.role_arn}: no answer in {self._call_timeout}s"
            )
        except MetaproxyError as exc:
            outcome = exc
        except asyncio.CancelledError:
            route.breaker.record_neutral()  # free a half-open probe slot
            raise
        except Exception:
            # Never pass unknown error text on: log it here, give the caller our own error.
            log.exception("unexpected error from the STS client")
            outcome = StsUnavailable(f"AssumeRole {spec.role_arn}: unexpected client error")
        finally:
            slot.release()  # a call that never left stops counting; one that left stays
        self._record(route, outcome, self._clock.monotonic() - started)
        return outcome

    def _record(self, route: Route, outcome: AssumedRole | MetaproxyError, seconds: float) -> None:
        breaker = route.breaker
        if isinstance(outcome, AssumedRole):
            self.ok += 1
            route.results["ok"] += 1
            breaker.record_success()
            self.latency.update(seconds, self._clock.monotonic())
            return
        route.results["throttled" if isinstance(outcome, StsThrottled) else "error"] += 1
        if isinstance(outcome, StsThrottled):
            self.throttles += 1
            breaker.record_neutral()  # STS answered; it is busy, not down
        elif isinstance(outcome, StsUnavailable):
            self.errors += 1
            breaker.record_failure()
        elif isinstance(outcome, UpstreamError):
            self.refused += 1
            breaker.record_success()  # STS answered: it is up
        else:
            self.errors += 1
            breaker.record_neutral()

    def stats(self) -> dict[str, float]:
        return {
            "sts_calls": float(self.calls),
            "sts_ok": float(self.ok),
            "throttles": float(self.throttles),
            "errors": float(self.errors),
            "timeouts": float(self.timeouts),
            "sts_refused": float(self.refused),
            "fast_failures": float(self.fast_failures),
            "sts_latency_seconds": self.latency.value,
            # With several regions: the best of them; open only when every region is.
            "circuit_state": self.routes.state_code,
            "circuit_open": 1.0 if self.routes.state_code == STATE_CODES["open"] else 0.0,
            "circuit_opened": float(self.routes.opened),
            "budget_per_second": self.budget_per_second,
            "budget_window_waits": float(self._window.waits),
            **self._budget.stats(),
            **self.routes.stats(),
        }


@dataclass(eq=False, slots=True)
class _Job:
    spec: AssumeRoleSpec
    future: asyncio.Future[AssumedRole]


async def _settle(job: _Job, caller: StsCaller, *, budget_taken: bool = False) -> None:
    """Run one job; its outcome (never an unknown exception's text) goes to its future. A job
    whose caller gives up (a revocation cancelled its fetch) stops its STS call too."""
    if job.future.done():
        return  # the caller gave up while it waited
    call = asyncio.ensure_future(caller.assume_role(job.spec, budget_taken=budget_taken))
    job.future.add_done_callback(lambda future: call.cancel() if future.cancelled() else None)
    try:
        role = await call
    except asyncio.CancelledError:
        worker = asyncio.current_task()
        if worker is not None and worker.cancelling():
            call.cancel()
            raise  # the worker itself is stopping
        return  # the call was stopped because its caller gave up
    except MetaproxyError as exc:
        if not job.future.done():
            job.future.set_exception(exc)
    else:
        if not job.future.done():
            job.future.set_result(role)


async def _await_job(job: _Job) -> AssumedRole:
    try:
        return await job.future
    except asyncio.CancelledError:
        job.future.cancel()  # workers skip it
        raise


class FairScheduler:
    """The broker's scheduler: fair bounded queue, autoscaled workers, budget, circuit."""

    def __init__(
        self,
        sts: StsClient,
        *,
        clock: Clock | None = None,
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
        self._clock: Clock = clock or SystemClock()
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
        self.queue: FairQueue[_Job] = FairQueue(
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
        self.pool: WorkerPool[_Job] = WorkerPool(self._next_job, self._handle)
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
        clock: Clock | None = None,
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
        job = _Job(spec, asyncio.get_running_loop().create_future())
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
        self._arrivals.count()
        self._scale_up_now()
        if shed is not None and not shed.item.future.done():
            shed.item.future.set_exception(
                Overloaded("refresh pushed out of a full queue by a cold start")
            )
        self._available.set()
        return await _await_job(job)

    def _ensure_running(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self.pool.resize(self.limits.workers_min)
            self._supervisor = asyncio.create_task(self._autoscale(), name="sts-autoscaler")

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
            self._update_drain_rate(time.monotonic())

    def _update_drain_rate(self, now: float) -> None:
        """What the queue will drain at: the pool as sized now, within the budget. The observed
        rate lags a burst by seconds, and would hand out far too long Retry-Afters."""
        capacity = self.pool.target / max(self._item_seconds.value, 1e-3)
        self.queue.drain_rate = max(
            self._completions.rate(now), min(capacity, self.limits.budget_per_second)
        )

    async def _next_job(self) -> _Job:
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

    async def _handle(self, job: _Job) -> None:
        started = time.monotonic()
        await _settle(job, self.caller, budget_taken=True)
        now = time.monotonic()
        self._item_seconds.update(now - started, now)
        self._completions.count()

    async def _autoscale(self) -> None:
        low_since: float | None = None
        while True:
            await asyncio.sleep(self._tick)
            now = time.monotonic()
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

    def stats(self) -> dict[str, float]:
        """For /metrics: queue_depth, queue_cold, queue_refresh (waiting, by priority),
        queue_rejected (overflow 503s), queue_shed, workers, workers_target, workers_busy,
        sts_calls (attempts), sts_ok, throttles, errors, timeouts, sts_refused (4xx),
        fast_failures (failed by the open circuit), circuit_state (0 closed, 1 half-open,
        2 open), circuit_open, circuit_opened (times), sts_latency_seconds, arrival_rate."""
        return {
            "queue_depth": float(len(self.queue)),
            "queue_cold": float(self.queue.depth("cold")),
            "queue_refresh": float(self.queue.depth("refresh")),
            "queue_tenants": float(self.queue.tenants()),
            "queue_max": float(self.queue.max_depth),
            "queue_rejected": float(self.queue.rejected),
            "queue_shed": float(self.queue.shed),
            "submitted": float(self.submitted),
            "workers": float(self.pool.size),
            "workers_target": float(self.pool.target),
            "workers_busy": float(self.pool.busy),
            "arrival_rate": self._arrivals.value,
            "item_seconds": self._item_seconds.value,
            **self.caller.stats(),
        }

    async def aclose(self) -> None:
        """Stop the autoscaler and the workers; waiting callers get StsUnavailable."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self.pool.close()
        while (entry := self.queue.pop()) is not None:
            if not entry.item.future.done():
                entry.item.future.set_exception(StsUnavailable("broker is shutting down"))


class FixedPoolScheduler:
    """The baseline: a fixed number of workers on one unbounded FIFO queue (the old design)."""

    def __init__(
        self,
        sts: StsClient,
        *,
        workers: int = 20,
        budget_per_second: float = 50.0,
        clock: Clock | None = None,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
    ) -> None:
        clock = clock or SystemClock()
        self.caller = StsCaller(
            sts,
            budget_per_second=budget_per_second,
            breaker=lambda: CircuitBreaker(clock),
            clock=clock,
            max_attempts=max_attempts,
            call_timeout=call_timeout,
        )
        self._workers = workers
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool: WorkerPool[_Job] = WorkerPool(self._queue.get, self._handle)

    async def submit(self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority) -> AssumedRole:
        if self.pool.size < self._workers:
            self.pool.resize(self._workers)
        job = _Job(spec, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await _await_job(job)

    async def _handle(self, job: _Job) -> None:
        await _settle(job, self.caller)

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": float(self._queue.qsize()),
            "queue_cold": float(self._queue.qsize()),
            "queue_refresh": 0.0,
            "workers": float(self.pool.size),
            **self.caller.stats(),
        }

    async def aclose(self) -> None:
        await self.pool.close()
