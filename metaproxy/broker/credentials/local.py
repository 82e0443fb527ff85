"""This replica's credential sets per (role, session, scope), with identical requests coalesced.

The top of the credential stack. Coalescing goes through one shared task per key, registered
before any `await` so a second caller arriving in the same loop iteration finds it; callers
await it through `shield` so one caller's cancellation (its sidecar hung up) does not cancel
the STS call the others wait for.

Refresh ahead: an entry is refreshed in the background from `revalidate_at` (90% of the way to
`refresh_at`) while callers keep getting the cached set, so with STS healthy a cached answer
always has at least (1 - refresh_fraction) of its lifetime left (30 minutes of a 1-hour set)
and no caller waits for STS on a warm key. Past `refresh_at` callers wait for the fetch.

It also knows which (tenant, task) each key was issued to, so a revocation drops exactly their
sets, and cancels their fetches in flight: what those bring back is never cached, and their
callers get `FetchCancelled`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from metaproxy.broker.credentials.source import (
    SERVE_FLOOR_SECONDS,
    CredentialSource,
    Dropped,
    Fetch,
    Fetched,
    Origin,
    Scope,
)
from metaproxy.broker.store.base import CacheClaim
from metaproxy.clock import Clock

log = logging.getLogger("metaproxy.broker.cache")

Key = tuple[object, ...]
REVALIDATE_SHARE = 0.9  # of the way from fetch to refresh_at, background refresh starts
# Beyond the serve floor, for the answer's way to the sidecar and the clocks' disagreement.
FLOOR_MARGIN_SECONDS = 60.0
MAX_TRACKED_OWNERS = 200_000  # twice the cache's own bound; the oldest owners go first


class FetchCancelled(Exception):
    """The fetch a caller waited for was cancelled (`LocalCache.drop`), not the caller."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    fetched: Fetched
    refresh_at: datetime
    revalidate_at: datetime  # from here on, refresh in the background

    def valid(self, now: datetime, floor_seconds: float) -> bool:
        return self.fetched.role.credentials.seconds_left(now) > floor_seconds


def refresh_schedule(lifetime: float, refresh_fraction: float) -> tuple[float, float]:
    """Seconds after a fetch of credentials with `lifetime` seconds to go when a background
    refresh starts (callers still get the cached set) and when callers wait for a new one."""
    refresh_in = min(
        lifetime * refresh_fraction,
        # Whatever the fraction (0.9 of an hour once served sets with 6 minutes left), a cached
        # set is served only while it has the sidecars' floor left, and a margin.
        max(0.0, lifetime - SERVE_FLOOR_SECONDS - FLOOR_MARGIN_SECONDS),
    )
    return refresh_in * REVALIDATE_SHARE, refresh_in


class LocalCache:
    def __init__(
        self,
        inner: CredentialSource,
        clock: Clock,
        *,
        refresh_fraction: float = 0.5,
        stale_floor_seconds: float = 300.0,
        max_entries: int = 100_000,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._refresh_fraction = refresh_fraction
        # While STS fails, a cached set is still handed out if it has this much life left.
        self._stale_floor = stale_floor_seconds
        self._max_entries = max_entries
        self._entries: dict[Key, CacheEntry] = {}
        self._in_flight: dict[Key, asyncio.Future[Fetched]] = {}
        # Which (tenant, task) each key was issued to: a revocation drops exactly theirs.
        self._owners: OrderedDict[Key, tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Fetched]:
        """A snapshot of the cached sets (diagnostics, and the test suite's secret scan)."""
        return [entry.fetched for entry in self._entries.values()]

    def claim(self, fetch: Fetch) -> CacheClaim | None:
        return self._inner.claim(fetch) if self._would_fetch(fetch.key) else None

    def release(self, fetch: Fetch) -> None:
        if fetch.key in self._in_flight:
            # The fleet's lease is this replica's, not this request's: a fetch of the key in
            # flight here holds the same lease, and gives it back when it fills. The rest (a
            # budget slot) goes back.
            fetch = replace(fetch, ticket=replace(fetch.ticket, look=None))
        self._inner.release(fetch)

    def _would_fetch(self, key: Key) -> bool:
        """Whether `get` now would go below (nothing to serve, nothing in flight)."""
        if key in self._in_flight:
            return False
        entry = self._entries.get(key)
        return entry is None or self._clock.now() >= entry.refresh_at

    async def get(self, fetch: Fetch) -> Fetched:
        key = fetch.key
        now = self._clock.now()
        renewal = self._owners.get(key) == (fetch.tenant, fetch.task)
        # Known before the fetch starts, so a revocation that arrives meanwhile finds the key
        # and cancels the fetch.
        self._remember_owner(key, fetch.tenant, fetch.task)
        entry = self._entries.get(key)
        if entry is not None and now < entry.refresh_at:
            if now >= entry.revalidate_at:
                self._start_fetch(key, fetch.as_refresh())  # in the background
            else:
                self.release(fetch)  # nothing below is asked: what it holds goes back
            return self._answer(entry.fetched, "cache", renewal)
        if entry is not None and entry.valid(now, self._stale_floor):
            fetch = fetch.as_refresh()  # a caller with a set in hand waits behind cold starts
        coalesced = key in self._in_flight
        task = self._start_fetch(key, fetch)
        try:
            fetched = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                # The fetch was cancelled (`drop`: a revocation), not this caller.
                raise FetchCancelled("the fetch this request waited for was cancelled") from None
            raise
        except Exception:
            entry = self._entries.get(key)
            if entry is not None and entry.valid(self._clock.now(), self._stale_floor):
                log.warning("STS failed; serving cached credentials until they near expiry")
                return self._answer(entry.fetched, "stale", renewal)
            raise
        finally:
            # The failed task holds the exception, whose traceback holds this frame: without
            # this, every refused request (a 503 in a burst) leaves a reference cycle of ~45
            # objects for the garbage collector, whose pauses then stall the STS workers.
            del task
        return self._answer(fetched, "coalesced" if coalesced else fetched.origin, renewal)

    @staticmethod
    def _answer(fetched: Fetched, origin: Origin, renewal: bool) -> Fetched:
        return Fetched(fetched.role, origin, fetched.fetched_at, renewal)

    def _start_fetch(self, key: Key, fetch: Fetch) -> asyncio.Future[Fetched]:
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._fetch_done, key))
        else:
            self.release(fetch)  # joins the fetch in flight: its ticket is not needed
        return task

    def _fetch_done(self, key: Key, task: asyncio.Future[Fetched]) -> None:
        self._in_flight.pop(key, None)
        # A background refresh may have no caller awaiting it; its failure is already handled
        # (the entry stays until it nears expiry), so mark the exception retrieved.
        if not task.cancelled():
            task.exception()

    async def _fetch(self, key: Key, fetch: Fetch) -> Fetched:
        fetched = await self._inner.get(fetch)
        now = self._clock.now()
        lifetime = fetched.role.credentials.seconds_left(now)
        revalidate_in, refresh_in = refresh_schedule(lifetime, self._refresh_fraction)
        self._entries[key] = CacheEntry(
            fetched, now + timedelta(seconds=refresh_in), now + timedelta(seconds=revalidate_in)
        )
        if len(self._entries) > self._max_entries:
            self._evict(now)
        return fetched

    def _evict(self, now: datetime) -> None:
        for key in [k for k, e in self._entries.items() if not e.valid(now, 0)]:
            del self._entries[key]
        while len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def _remember_owner(self, key: Key, tenant: str, task: str) -> None:
        self._owners[key] = (tenant, task)
        self._owners.move_to_end(key)
        if len(self._owners) > MAX_TRACKED_OWNERS:
            self._owners.popitem(last=False)

    def drop(self, scope: Scope) -> int:
        doomed = {key for key, owner in self._owners.items() if scope.covers(*owner)}
        for key in doomed:
            del self._owners[key]
        dropped = 0
        for key in doomed:
            dropped += self._entries.pop(key, None) is not None
            flight = self._in_flight.get(key)
            if flight is not None:
                flight.cancel()
        return dropped + self._inner.drop(scope)

    def forget(self, scope: Scope) -> Dropped:
        """`drop`, and the role ARNs of what went (for the revocation's answer)."""
        roles = {str(key[0]) for key, owner in self._owners.items() if scope.covers(*owner)}
        return Dropped(self.drop(scope), tuple(sorted(roles)))
