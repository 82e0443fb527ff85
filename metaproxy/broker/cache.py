"""Credentials cached per (role, session, scope), with concurrent identical requests coalesced.

Coalescing goes through one shared task per key, registered before any `await` so a second
caller arriving in the same loop iteration finds it; callers await it through `shield` so one
caller's cancellation (its sidecar hung up) does not cancel the STS call the others wait for.

Refresh ahead: an entry is refreshed in the background from `revalidate_at` (90% of the way to
`refresh_at`) while callers keep getting the cached set, so with STS healthy a cached answer
always has at least (1 - refresh_fraction) of its lifetime left (30 minutes of a 1-hour set)
and no caller waits for STS on a warm key. Past `refresh_at` callers wait for the fetch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from metaproxy.broker.sts import AssumedRole
from metaproxy.clock import Clock

log = logging.getLogger("metaproxy.broker.cache")

Key = tuple[object, ...]


class FetchCancelled(Exception):
    """The fetch a caller waited for was cancelled (`CredentialCache.drop`), not the caller."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    role: AssumedRole
    fetched_at: datetime
    refresh_at: datetime
    revalidate_at: datetime | None = None  # from here on, refresh in the background

    def valid(self, now: datetime, floor_seconds: float) -> bool:
        return self.role.credentials.seconds_left(now) > floor_seconds


@dataclass(frozen=True, slots=True)
class CacheResult:
    role: AssumedRole
    source: str  # "cache" | "sts" | "coalesced" | "stale" (STS failing, still valid)


REVALIDATE_SHARE = 0.9  # of the way from fetch to refresh_at, background refresh starts


def refresh_schedule(lifetime: float, refresh_fraction: float) -> tuple[float, float]:
    """Seconds after a fetch of credentials with `lifetime` seconds to go when a background
    refresh starts (callers still get the cached set) and when callers wait for a new one."""
    refresh_in = lifetime * refresh_fraction
    return refresh_in * REVALIDATE_SHARE, refresh_in


class CredentialCache:
    def __init__(
        self,
        clock: Clock,
        *,
        refresh_fraction: float = 0.5,
        stale_floor_seconds: float = 300.0,
        max_entries: int = 100_000,
    ) -> None:
        self._clock = clock
        self._refresh_fraction = refresh_fraction
        # While STS fails, a cached set is still handed out if it has this much life left.
        self._stale_floor = stale_floor_seconds
        self._max_entries = max_entries
        self._entries: dict[Key, CacheEntry] = {}
        self._in_flight: dict[Key, asyncio.Future[AssumedRole]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        """A snapshot of the cached sets (diagnostics, and the test suite's secret scan)."""
        return list(self._entries.values())

    def peek(self, key: Key) -> CacheEntry | None:
        return self._entries.get(key)

    def has_valid(self, key: Key) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.valid(self._clock.now(), self._stale_floor)

    def would_fetch(self, key: Key) -> bool:
        """Whether `get(key, …)` now would call its fetcher (nothing to serve, none in flight)."""
        if key in self._in_flight:
            return False
        entry = self._entries.get(key)
        return entry is None or self._clock.now() >= entry.refresh_at

    async def get(self, key: Key, fetch: Callable[[], Awaitable[AssumedRole]]) -> CacheResult:
        now = self._clock.now()
        entry = self._entries.get(key)
        if entry is not None and now < entry.refresh_at:
            if entry.revalidate_at is not None and now >= entry.revalidate_at:
                self._start_fetch(key, fetch)  # in the background; joins one in flight
            return CacheResult(entry.role, "cache")
        source = "coalesced" if key in self._in_flight else "sts"
        task = self._start_fetch(key, fetch)
        try:
            role = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                # The fetch was cancelled (`cancel`: a revocation), not this caller.
                raise FetchCancelled("the fetch this request waited for was cancelled") from None
            raise
        except Exception:
            entry = self._entries.get(key)
            if entry is not None and entry.valid(self._clock.now(), self._stale_floor):
                log.warning("STS failed; serving cached credentials until they near expiry")
                return CacheResult(entry.role, "stale")
            raise
        finally:
            # The failed task holds the exception, whose traceback holds this frame: without
            # this, every refused request (a 503 in a burst) leaves a reference cycle of ~45
            # objects for the garbage collector, whose pauses then stall the STS workers.
            del task
        return CacheResult(role, source)

    def _start_fetch(
        self, key: Key, fetch: Callable[[], Awaitable[AssumedRole]]
    ) -> asyncio.Future[AssumedRole]:
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._fetch_done, key))
        return task

    def _fetch_done(self, key: Key, task: asyncio.Future[AssumedRole]) -> None:
        self._in_flight.pop(key, None)
        # A background refresh may have no caller awaiting it; its failure is already handled
        # (the entry stays until it nears expiry), so mark the exception retrieved.
        if not task.cancelled():
            task.exception()

    async def _fetch(self, key: Key, fetch: Callable[[], Awaitable[AssumedRole]]) -> AssumedRole:
        role = await fetch()
        now = self._clock.now()
        lifetime = role.credentials.seconds_left(now)

        revalidate_in, refresh_in = refresh_schedule(lifetime, self._refresh_fraction)
        refresh_at = now + timedelta(seconds=refresh_in)
        revalidate_at = now + timedelta(seconds=revalidate_in)
        self._entries[key] = CacheEntry(role, now, refresh_at, revalidate_at)
        if len(self._entries) > self._max_entries:
            self._evict(now)
        return role

    def _evict(self, now: datetime) -> None:
        for key in [k for k, e in self._entries.items() if not e.valid(now, 0)]:
            del self._entries[key]
        while len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def drop(self, predicate: Callable[[Key], bool]) -> int:
        """Forget entries (revocation), and cancel the fetches of those keys still in flight:
        whatever they bring back is never cached, and their callers get `FetchCancelled`.
        Returns how many entries went."""
        doomed = [k for k in self._entries if predicate(k)]
        for key in doomed:
            del self._entries[key]
        for key, task in list(self._in_flight.items()):
            if predicate(key):
                task.cancel()
        return len(doomed)
