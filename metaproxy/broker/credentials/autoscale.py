"""How many STS workers to run, and the pool of worker tasks that follows that number.

A fixed pool of 20 workers once fell behind a growing fleet; here the pool follows the load.
Little's law gives the workers needed to sustain a throughput: workers ≈ rate × time per item.
The rate wanted is what arrives plus enough to drain the backlog within a couple of seconds,
but never more than the STS call budget allows: workers beyond budget × latency would only
wait at the limiter. Scaling up happens on the next tick (a deployment is happening now);
scaling down waits until the load has been low for a while, and then goes in steps, so a
bursty fleet does not make the pool thrash.

`decide` is pure (time is an argument) so the policy is tested without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")


@dataclass(frozen=True, slots=True)
class ScaleLimits:
    workers_min: int
    workers_max: int
    budget_per_second: float
    headroom: float = 1.25  # latency varies; a few spare workers keep the budget busy
    drain_horizon: float = 2.0  # aim to clear a backlog within this many seconds
    scale_down_after: float = 30.0  # low load must last this long before workers go
    scale_down_step: float = 0.25  # then at most this fraction of the pool goes per tick


@dataclass(frozen=True, slots=True)
class Load:
    depth: int  # items waiting
    arrival_rate: float  # items per second arriving
    item_seconds: float  # time a worker spends per item (STS latency, retries, backoff)
    busy: int = 0  # workers in the middle of an item


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    workers: int
    low_since: float | None  # when the wanted size first fell below the current one


def wanted_workers(load: Load, limits: ScaleLimits) -> int:
    """Little's law, capped by the budget: the pool size that sustains the wanted rate; and
    while items wait, at least a worker for each of them (and each busy one), up to what the
    budget can use.

    The second rule is for a cold start. The rates only catch up with a jump over a second or
    two (5,000 tasks arriving at 200/s on an idle broker read as 49/s after 0.75 s), and sized
    from them the pool kept ~100 tasks queued for 4 s: 600-700 ms of waiting on a 100 ms call
    (bench/cold_start.py). Every item waiting could be at STS now, within the budget."""
    item_seconds = max(load.item_seconds, 0.0)
    rate = load.arrival_rate + load.depth / limits.drain_horizon
    rate = min(rate, limits.budget_per_second)
    needed = math.ceil(rate * item_seconds * limits.headroom)
    if load.depth > 0:
        usable = math.ceil(limits.budget_per_second * item_seconds * limits.headroom)
        needed = max(needed, min(load.busy + load.depth, max(usable, 1)), load.busy, 1)
    return min(limits.workers_max, max(limits.workers_min, needed))


def decide(
    current: int, load: Load, limits: ScaleLimits, *, now: float, low_since: float | None
) -> ScaleDecision:
    """The pool size to run now: up at once, down only after `scale_down_after` of low load."""
    wanted = wanted_workers(load, limits)
    if wanted >= current:
        return ScaleDecision(wanted, None)
    if low_since is None:
        return ScaleDecision(current, now)
    if now - low_since < limits.scale_down_after:
        return ScaleDecision(current, low_since)
    step = max(1, math.floor(current * limits.scale_down_step))
    return ScaleDecision(max(wanted, current - step), low_since)


class Ewma:
    """Exponentially weighted moving average with a time constant, fed irregular samples."""

    def __init__(self, initial: float, time_constant: float) -> None:
        self.value = initial
        self._tau = time_constant
        self._last: float | None = None

    def update(self, sample: float, now: float) -> float:
        if self._last is None:
            self.value = sample
        else:
            weight = 1.0 - math.exp(-max(now - self._last, 0.0) / self._tau)
            self.value += (sample - self.value) * max(weight, 0.05)
        self._last = now
        return self.value


class RateMeter:
    """Events per second: `count()` on each event, `rate(now)` on each tick. It rises to a
    higher rate at once and falls off smoothly (`time_constant`), so a burst is seen on the
    tick after it starts and a pause does not shrink the pool."""

    def __init__(self, time_constant: float = 2.0) -> None:
        self._events = 0
        self._since: float | None = None
        self._tau = time_constant
        self.value = 0.0

    def count(self, n: int = 1, now: float | None = None) -> None:
        if self._since is None and now is not None:
            self._since = now  # the first events' interval starts with them, not at a tick
        self._events += n

    def rate(self, now: float) -> float:
        if self._since is None:
            self._since = now
            return self.value
        elapsed = now - self._since
        if elapsed <= 0:
            return self.value
        sample = self._events / elapsed
        if sample >= self.value:
            self.value = sample
        else:
            self.value += (sample - self.value) * (1.0 - math.exp(-elapsed / self._tau))
        self._events, self._since = 0, now
        return self.value


class WorkerPool(Generic[J]):
    """Worker tasks that take a job (`next_job`, which waits) and `handle` it, one at a time.

    `resize(n)` starts workers at once; surplus workers leave when idle, or after the job
    they are on: a call to STS in flight is never cancelled by a scale-down.
    """

    def __init__(
        self,
        next_job: Callable[[], Awaitable[J]],
        handle: Callable[[J], Awaitable[None]],
        *,
        name: str = "sts-worker",
    ) -> None:
        self._next_job = next_job
        self._handle = handle
        self._name = name
        self._target = 0
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._idle: set[int] = set()
        self._serial = 0
        self.started = 0

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def target(self) -> int:
        return self._target

    @property
    def busy(self) -> int:
        return len(self._workers) - len(self._idle)

    def resize(self, target: int) -> None:
        self._target = max(0, target)
        while len(self._workers) < self._target:
            self._serial += 1
            worker_id = self._serial
            # A context of its own: a worker started during a request must not log as it.
            self._workers[worker_id] = asyncio.create_task(
                self._run(worker_id),
                name=f"{self._name}-{worker_id}",
                context=contextvars.Context(),
            )
            self.started += 1
        surplus = len(self._workers) - self._target
        for worker_id in list(self._idle)[: max(surplus, 0)]:
            # Idle workers are only waiting for a job; cancelling that wait loses nothing.
            self._workers.pop(worker_id).cancel()
            self._idle.discard(worker_id)

    async def aclose(self) -> None:
        self._target = 0
        tasks = list(self._workers.values())
        self._workers.clear()
        self._idle.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, worker_id: int) -> None:
        try:
            while worker_id in self._workers and len(self._workers) <= self._target:
                self._idle.add(worker_id)
                try:
                    job = await self._next_job()
                finally:
                    self._idle.discard(worker_id)
                await self._handle(job)
        finally:
            self._workers.pop(worker_id, None)
