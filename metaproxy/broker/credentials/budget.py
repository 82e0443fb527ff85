"""The global STS call budget: a smooth rate, and a hard cap at the moment of each call.

Two parts, because each alone falls short:
- `budget_limiter` (aiolimiter's leaky bucket) paces calls evenly. It counts when a token is
  taken, and a busy event loop can hold a request for tens of milliseconds between the token
  and the socket, then let several go together: STS would see a 1 s window slightly over.
- `CallWindow` counts the calls themselves, in the trailing second, from the moment each one's
  bytes leave; past its limit a call waits. It is the guarantee; the bucket keeps it from having
  to act often.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

# Kept back from the budget by the call window, for the time between our send (which the
# window counts) and STS's count of the call: the network, and the receiver's own scheduling.
# Behind the fault proxy on a 2-core machine running four busy processes, the proxy counted up
# to 22 calls more in its busiest second than the broker sent in its own (502 for 480).
WINDOW_MARGIN = 0.06
# A budget slot woken up later than this is not used (a call sent late bunches with the calls
# on time after it). Late calls add at most this share of a second's rate to any one second at
# STS: with the fleet budget's margin and burst tolerance (store/redis_budget.py), 0.94 + 0.03
# + 0.02 of the budget (297 of 300), leaving room for the time between a slot and the call's
# arrival at STS.
LATE_SLOT_SECONDS = 0.03


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
    """At most `limit` calls on the wire in any trailing `window` seconds (event-loop time).

    `admit` counts a call at once, as pending, and returns its `WindowSlot`; the STS client
    stamps the slot when the request's bytes leave (`WindowSlot.sent`), and the call counts
    from that moment. Counting at admission was not enough: the HTTP client writes the body
    one event-loop turn after it is handed the request, and on a busy broker that turn can
    come 100 ms later, so calls admitted across a long turn left together (the burst bench
    measured 501 sends in one second of a 480/s window, 508 at the fault proxy)."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a call window needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()  # when counted calls went out, oldest first
        self._pending = 0  # admitted, not on the wire yet
        self.waits = 0  # calls the window held back (the bucket alone would have let them go)

    @classmethod
    def for_budget(cls, calls_per_second: float) -> CallWindow:
        return cls(max(1, math.floor(calls_per_second * (1 - WINDOW_MARGIN))))

    async def admit(self) -> WindowSlot:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
            if len(self._times) + self._pending < self.limit:
                self._pending += 1
                return WindowSlot(self)
            self.waits += 1
            # Full with calls still pending: they count from when they leave, in a moment.
            wake = self._times[0] + self.window if self._times else now + PENDING_RECHECK_SECONDS
            await asyncio.sleep(max(wake - now, PENDING_RECHECK_SECONDS))

    def record_sent(self) -> None:
        self._pending -= 1
        self._times.append(asyncio.get_running_loop().time())

    def record_dropped(self) -> None:
        self._pending -= 1


# How soon a caller held back by pending calls (admitted, not yet sent) looks again.
PENDING_RECHECK_SECONDS = 0.005


class WindowSlot:
    """One admitted call: `sent` when its bytes leave (it counts from then), `release` when the
    attempt is over (a call that never left stops counting)."""

    __slots__ = ("_settled", "_window")

    def __init__(self, window: CallWindow) -> None:
        self._window = window
        self._settled = False

    def sent(self) -> None:
        if not self._settled:
            self._settled = True
            self._window.record_sent()

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            self._window.record_dropped()
