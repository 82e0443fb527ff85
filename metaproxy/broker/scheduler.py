"""Gets STS calls done: bounded queue, worker limit, the global STS call budget, retries.

`StsScheduler` is the seam between the issuer and STS. Everything that decides *when* an
AssumeRole call happens (fairness across tenants, cold starts before refreshes, how many calls
run at once, how fast) lives behind it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Literal, Protocol

from aiolimiter import AsyncLimiter

from metaproxy.broker.sts import AssumedRole, StsClient, StsThrottled
from metaproxy.errors import Overloaded, StsUnavailable
from metaproxy.models import AssumeRoleSpec

log = logging.getLogger("metaproxy.broker.scheduler")

Priority = Literal["cold", "refresh"]


class StsScheduler(Protocol):
    async def submit(
        self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority
    ) -> AssumedRole: ...

    def stats(self) -> dict[str, float]: ...


def full_jitter_backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """AWS's "full jitter": uniform over [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto


class SimpleScheduler:
    """A bounded number of concurrent calls within the budget; retries throttling with jitter."""

    def __init__(
        self,
        sts: StsClient,
        *,
        workers: int,
        budget_per_second: float,
        queue_max: int,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
    ) -> None:
        self._sts = sts
        self._slots = asyncio.Semaphore(workers)
        self._budget = AsyncLimiter(budget_per_second, 1.0)
        self._queue_max = queue_max
        self._max_attempts = max_attempts
        self._call_timeout = call_timeout
        self._waiting = 0
        self._calls = 0
        self._throttles = 0

    async def submit(self, spec: AssumeRoleSpec, *, tenant: str, priority: Priority) -> AssumedRole:
        if self._waiting >= self._queue_max:
            raise Overloaded(f"queue full ({self._waiting})", retry_after=1.0)
        self._waiting += 1
        try:
            async with self._slots:
                return await self._call_with_retries(spec)
        finally:
            self._waiting -= 1

    async def _call_with_retries(self, spec: AssumeRoleSpec) -> AssumedRole:
        for attempt in range(self._max_attempts):
            await self._budget.acquire()
            self._calls += 1
            try:
                return await asyncio.wait_for(self._sts.assume_role(spec), self._call_timeout)
            except StsThrottled:
                self._throttles += 1
                if attempt + 1 == self._max_attempts:
                    raise
            except TimeoutError:
                if attempt + 1 == self._max_attempts:
                    raise StsUnavailable("AssumeRole timed out") from None
            await asyncio.sleep(full_jitter_backoff(attempt))
        raise StsUnavailable("AssumeRole retries exhausted")

    def stats(self) -> dict[str, float]:
        return {"queued": self._waiting, "sts_calls": self._calls, "throttles": self._throttles}
