"""Time comes in through a small protocol so tests can move it without sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    # The function itself, not a method calling it: the sidecar reads it several times per
    # request.
    monotonic = staticmethod(time.monotonic)


def iso_z(moment: datetime) -> str:
    """AWS's timestamp form: `YYYY-MM-DDTHH:MM:SSZ` (botocore parses exactly this)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
