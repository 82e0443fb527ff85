"""What a failed authentication may cost: bounded audit records and log lines per peer.

Every unauthenticated request used to cost an fsynced audit record and a WARNING line, without
limit: one client grew the audit directory by 2.3 MB/s, enough to fill a Deployment's 2 GiB
audit volume in about 15 minutes and get the pod evicted. Now, per peer address:

- the first failure with a given reason is recorded as before; identical failures from the
  same peer within `window` seconds are counted, answered 401 without a log line, and written
  as one summary record (`count`) when the window ends;
- records of *new* reasons come from a token bucket (`burst`, refilled at `per_second`); a
  peer that has spent it is answered 429 before its failure costs anything, and those refusals
  are summarised the same way.

Verification itself still runs for every request, so a valid token from a peer that also sent
bad ones is served as usual: only failures are limited. Summaries are never dropped: a window
that cannot be written stays pending until the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from metaproxy.audit.record import AuditEvent
from metaproxy.clock import Clock
from metaproxy.errors import AuditUnavailable, TooManyRequests, Unauthenticated

log = logging.getLogger("metaproxy.broker")

WINDOW_SECONDS = 60.0
BURST = 20  # distinct failure records a peer may cost at once
PER_SECOND = 1.0  # and then per second
MAX_TRACKED = 10_000  # windows and peers; past it the oldest window is summarised early
OVER_LIMIT = "failed authentications over the per-peer limit"


@dataclass(slots=True)
class _Window:
    opened: float  # monotonic
    status: int
    repeats: int = 0  # answered but not recorded one by one


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class EventLog(Protocol):
    """Where the events go: the broker's `AuditTrail`, which adds the replica's name."""

    async def append(self, event: AuditEvent) -> None: ...


class FailedAuthentications:
    def __init__(
        self,
        audit: EventLog,
        clock: Clock,
        *,
        rule: str = "authentication",
        window: float = WINDOW_SECONDS,
        burst: int = BURST,
        per_second: float = PER_SECOND,
    ) -> None:
        self._audit = audit
        self._clock = clock
        self._rule = rule  # "authentication" (credential requests) or "control-authentication"
        self._window = window
        self._burst = burst
        self._per_second = per_second
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._closed: list[tuple[tuple[str, str], _Window]] = []  # summaries still to write
        self._flusher: asyncio.Task[None] | None = None
        self.summarised = 0  # failures answered without their own record (metrics, tests)

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever(), name="auth-failure-summaries")

    async def aclose(self) -> None:
        """Stop the timer and write every pending summary (before the audit log closes)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(AuditUnavailable):
            await self.flush(everything=True)

    async def failed(self, exc: Unauthenticated, request_id: str, peer: str) -> None:
        """Account for one failed authentication: record it, count it, or refuse the peer
        (TooManyRequests). Returns when `exc` may be raised to the client."""
        now = self._clock.monotonic()
        window = self._windows.get((peer, exc.detail))
        if window is not None and now - window.opened < self._window:
            window.repeats += 1
            self.summarised += 1
            exc.quiet = True  # one WARNING per window, not per request
            return
        if not self._take(peer, now):
            self._count((peer, OVER_LIMIT), now, 429)
            self.summarised += 1
            refused = TooManyRequests(OVER_LIMIT, retry_after=self._window)
            refused.quiet = True
            raise refused from None
        await self._audit.append(
            AuditEvent(
                event="denied",
                request_id=request_id,
                peer=peer,
                rule=self._rule,
                reason=exc.detail,
                status=401,
            )
        )
        self._open((peer, exc.detail), _Window(now, 401))

    def _take(self, peer: str, now: float) -> bool:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(float(self._burst), now)
            if len(self._buckets) > MAX_TRACKED:
                self._buckets.popitem(last=False)  # a forgotten peer starts with a full bucket
        self._buckets.move_to_end(peer)
        bucket.tokens = min(
            float(self._burst), bucket.tokens + (now - bucket.updated) * self._per_second
        )
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _count(self, key: tuple[str, str], now: float, status: int) -> None:
        window = self._windows.get(key)
        if window is None or now - window.opened >= self._window:
            window = _Window(now, status)
            self._open(key, window)
        window.repeats += 1

    def _open(self, key: tuple[str, str], window: _Window) -> None:
        previous = self._windows.pop(key, None)
        if previous is not None and previous.repeats:
            self._closed.append((key, previous))
        self._windows[key] = window
        if len(self._windows) > MAX_TRACKED:
            self._closed.append(self._windows.popitem(last=False))

    async def flush(self, *, everything: bool = False) -> int:
        """Write a summary record for each ended window (every window with `everything`) that
        counted repeats; returns how many were written."""
        now = self._clock.monotonic()
        for key, window in list(self._windows.items()):
            if everything or now - window.opened >= self._window:
                del self._windows[key]
                if window.repeats:
                    self._closed.append((key, window))
        written = 0
        while self._closed:
            (peer, reason), window = self._closed[0]
            summary = AuditEvent(
                event="denied",
                request_id=f"summary-{secrets.token_hex(8)}",
                peer=peer,
                rule=self._rule,
                reason=f"{reason} (repeated)",
                status=window.status,
                count=window.repeats,  # how many answered failures this one record stands for
            )
            await self._audit.append(summary)  # AuditUnavailable: kept for the next flush
            self._closed.pop(0)
            written += 1
        return written

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self._window / 4))
            try:
                await self.flush()
            except AuditUnavailable as exc:
                log.warning("authentication failure summaries not written yet: %s", exc.detail)
