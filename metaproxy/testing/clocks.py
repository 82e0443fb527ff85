"""Clocks for tests: time moved by hand (`ManualClock`), or by the event loop itself
(`VirtualTimeLoop`, read through `metaproxy.clock.LoopClock`).

`VirtualTimeLoop` is an asyncio event loop whose time jumps ahead whenever it would otherwise
wait for a timer. With every part of a test in the one event loop (no other process, no
thread), the only thing that can wake the loop while it waits for its next timer is I/O between
those parts, which is already there when the loop looks: so the loop looks (without waiting),
and if nothing is ready it moves its clock to the timer instead of sleeping until it.
`asyncio.sleep`, `asyncio.timeout` and `loop.time()` all follow; a test's cool-downs and ticks
run in the milliseconds their code takes, in the same order as in real time. Not for tests
that wait on another process or a thread: their answers come in real time, which this loop
would skip past.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import selectors
from datetime import UTC, datetime, timedelta

START = datetime(2026, 1, 1, tzinfo=UTC)
# The least the virtual clock moves at each turn of the loop that finds no I/O (a real one
# moves more than this between two turns).
TICK_SECONDS = 1e-6


class ManualClock:
    """Wall-clock and monotonic time that move together, only when the test moves them
    (`advance`, or setting `moment`); `sleep` returns once the test has moved past its end."""

    def __init__(self, moment: datetime = START) -> None:
        self._moment = moment
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def moment(self) -> datetime:
        return self._moment

    @moment.setter
    def moment(self, value: datetime) -> None:
        if value < self._moment:
            raise ValueError("a monotonic clock never goes back")
        self._moment = value
        while self._sleepers and self._sleepers[0][0] <= value:
            _, _, waker = heapq.heappop(self._sleepers)
            if not waker.done():
                waker.set_result(None)

    def advance(self, seconds: float) -> None:
        self.moment = self._moment + timedelta(seconds=seconds)

    def now(self) -> datetime:
        return self._moment

    def monotonic(self) -> float:
        return self._moment.timestamp()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waker = asyncio.get_running_loop().create_future()
        wake_at = self._moment + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (wake_at, next(self._order), waker))
        await waker


class _PollingSelector(selectors.DefaultSelector):
    """Looks for I/O without waiting, and tells the loop how long it would have waited."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return super().select(None)  # nothing scheduled: only I/O can wake the loop
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if not ready:
            # At least a tick, as a real clock moves while the loop turns: a timer set a
            # rounding error ahead (aiolimiter's next leak) would otherwise come due at the
            # same float forever.
            self._loop.advance(max(timeout, TICK_SECONDS))
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`loop.time()` starts at 0 and moves only by the waits the loop skips."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_PollingSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds
