"""Time comes in through a small protocol so tests can move it without sleeping.

A component that waits or measures intervals asks its clock (`monotonic`; `sleep`, on a
`WaitingClock`), never `time` or `asyncio` directly: a test then runs it on `LoopClock` under
the virtual-time event loop (`metaproxy.testing.clocks`), where a 30 s cool-down passes in no
real time at all.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class WaitingClock(Clock, Protocol):
    """A clock a component also waits on (the scheduler's ticks, retry backoffs, the revocation
    view's re-reads). Its own protocol, so a component that only reads the time still takes
    any `Clock`, and a test's clock need not know how to wait."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    # The function itself, not a method calling it: the sidecar reads it several times per
    # request.
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class LoopClock:
    """The running event loop's time: real on a real loop, virtual on a virtual-time loop.

    Wall-clock time starts at `start` (now, by default) and moves with the loop's time, so the
    two clocks stay in step whatever the loop does with time."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime.now(UTC)
        self._origin: float | None = None

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.monotonic() - self._loop_origin())

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _loop_origin(self) -> float:
        if self._origin is None:
            self._origin = self.monotonic()
        return self._origin


def iso_z(moment: datetime) -> str:
    """AWS's timestamp form: `YYYY-MM-DDTHH:MM:SSZ` (botocore parses exactly this)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
