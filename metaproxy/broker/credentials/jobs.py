"""What both schedulers share: a job (one AssumeRole and the future its caller awaits), how
a worker settles one, what a scheduler answers as the bottom of the credential stack, and its
figures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from metaproxy.broker.credentials.caller import CallerStats, StsCaller
from metaproxy.broker.credentials.source import Fetch, Fetched, Scope
from metaproxy.broker.credentials.sts import AssumedRole
from metaproxy.broker.store.base import CacheClaim
from metaproxy.clock import Clock
from metaproxy.errors import MetaproxyError
from metaproxy.models import AssumeRoleSpec


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A scheduler's figures: its queue, its workers, and its STS calls (`sts`). The
    baseline (`FixedPoolScheduler`) has one FIFO queue and a fixed pool, and leaves the
    figures it has no use for at zero."""

    queue_depth: int  # waiting, both priorities
    queue_cold: int
    queue_refresh: int
    workers: int  # running
    sts: CallerStats
    queue_tenants: int = 0  # tenants with work waiting
    queue_max: int = 0
    queue_rejected: int = 0  # refused by a full queue (503 with Retry-After)
    queue_shed: int = 0  # refreshes pushed out by cold starts
    submitted: int = 0
    workers_target: int = 0  # what the autoscaler asked for
    workers_busy: int = 0
    arrival_rate: float = 0.0  # per second, moving average
    item_seconds: float = 0.0  # one job's time in a worker, moving average


class QueuedSource:
    """What both schedulers answer as the bottom of the credential stack."""

    caller: StsCaller
    _clock: Clock
    submit: Callable[..., Awaitable[AssumedRole]]  # (spec, *, tenant, priority): its own queue

    def claim(self, fetch: Fetch) -> CacheClaim | None:
        return None  # nothing shared below here to ask

    def release(self, fetch: Fetch) -> None:
        if fetch.ticket.budget_due is not None:
            self.caller.give_slot(fetch.ticket.budget_due)  # the next call spends it

    def drop(self, scope: Scope) -> int:
        return 0  # nothing cached; callers cancelled by the revocation stop their jobs

    async def get(self, fetch: Fetch) -> Fetched:
        self.release(fetch)
        role = await self.submit(fetch.spec, tenant=fetch.tenant, priority=fetch.priority)
        return Fetched(role, "sts", self._clock.now())

    async def start(self) -> None:
        return None  # workers start with the first job


@dataclass(eq=False, slots=True)
class Job:
    spec: AssumeRoleSpec
    future: asyncio.Future[AssumedRole]


async def settle(job: Job, caller: StsCaller, *, budget_taken: bool = False) -> None:
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


async def await_job(job: Job) -> AssumedRole:
    try:
        return await job.future
    except asyncio.CancelledError:
        job.future.cancel()  # workers skip it
        raise
