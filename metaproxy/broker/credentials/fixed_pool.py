"""The baseline the broker's scheduler replaced: a fixed number of workers on one unbounded
FIFO queue. Kept as the benchmarks' reference (`bench/broker_burst.py`)."""

from __future__ import annotations

import asyncio

from metaproxy.broker.credentials.autoscale import WorkerPool
from metaproxy.broker.credentials.caller import StsCaller
from metaproxy.broker.credentials.circuit import CircuitBreaker
from metaproxy.broker.credentials.jobs import (
    Job,
    QueuedSource,
    SchedulerStats,
    await_job,
    settle,
)
from metaproxy.broker.credentials.source import Priority
from metaproxy.broker.credentials.sts import AssumedRole, StsClient
from metaproxy.clock import SystemClock, WaitingClock
from metaproxy.models import AssumeRoleSpec


class FixedPoolScheduler(QueuedSource):
    """The baseline: a fixed number of workers on one unbounded FIFO queue (the old design)."""

    def __init__(
        self,
        sts: StsClient,
        *,
        workers: int = 20,
        budget_per_second: float = 50.0,
        clock: WaitingClock | None = None,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
    ) -> None:
        self._clock = clock = clock or SystemClock()
        self.caller = StsCaller(
            sts,
            budget_per_second=budget_per_second,
            breaker=lambda: CircuitBreaker(clock),
            clock=clock,
            max_attempts=max_attempts,
            call_timeout=call_timeout,
        )
        self._workers = workers
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pool: WorkerPool[Job] = WorkerPool(self._queue.get, self._handle)

    async def submit(self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority) -> AssumedRole:
        if self.pool.size < self._workers:
            self.pool.resize(self._workers)
        job = Job(spec, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await await_job(job)

    async def _handle(self, job: Job) -> None:
        await settle(job, self.caller)

    def stats(self) -> SchedulerStats:
        waiting = self._queue.qsize()
        return SchedulerStats(
            queue_depth=waiting,
            queue_cold=waiting,  # one queue: every job counts as cold
            queue_refresh=0,
            workers=self.pool.size,
            sts=self.caller.stats(),
            workers_target=self.pool.target,
            workers_busy=self.pool.busy,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()
