"""The global STS call budget: a smooth rate, and a hard cap at the moment of each call.

Two parts, because each alone falls short:
- `budget_limiter` (aiolimiter's leaky bucket) paces calls evenly. It counts when a token is
  taken, and a busy event loop can hold a request for tens of milliseconds between the token
  and the socket, then let several go together: STS would see a 1 s window slightly over.
- `CallWindow` counts the calls themselves, in the trailing second, right before each is sent;
  past its limit a call waits. It is the guarantee; the bucket keeps it from having to act often.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

# Kept back from the budget by the call window, for the time between our send and STS's count
# (the burst bench measured up to 13 calls/s over a 485/s window at the fault proxy).
WINDOW_MARGIN = 0.04


def budget_limiter(calls_per_second: float) -> AsyncLimiter:
    """A leaky bucket that paces calls at the call window's limit.

    AsyncLimiter(rate, 1.0) would allow a full bucket *plus* a second's leak in one window
    (up to twice the budget, e.g. when STS comes back after an outage). So the bucket is small
    (2% of a second's budget) and leaks at the call window's limit: the window, not the bucket,
    is what guarantees the budget, and the bucket keeps calls from arriving at it in clumps.
    """
    if calls_per_second <= 0:
        raise ValueError("the STS call budget must be positive")
    burst = max(1.0, calls_per_second * 0.02)
    # Burst plus a second's leak stays within the budget; the window trims the burst.
    leak = calls_per_second * (1 - WINDOW_MARGIN)
    return AsyncLimiter(burst, burst / leak)


class CallWindow:
    """At most `limit` calls in any trailing `window` seconds (event-loop time), counted when
    `admit` returns: the caller sends right after, with no await in between."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a call window needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()
        self.waits = 0  # calls the window held back (the bucket alone would have let them go)

    @classmethod
    def for_budget(cls, calls_per_second: float) -> CallWindow:
        return cls(max(1, math.floor(calls_per_second * (1 - WINDOW_MARGIN))))

    async def admit(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
            if len(self._times) < self.limit:
                self._times.append(now)
                return
            self.waits += 1
            await asyncio.sleep(self._times[0] + self.window - now)
