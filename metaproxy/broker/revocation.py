"""This replica's view of the fleet's revocations, and how far it can be trusted.

The store holds them durably and pushes every change to every replica; a full re-read every
`--revocation-resync-seconds` is the backstop for a push that was lost. The view is *stale*
once no re-read has worked for `--revocation-max-staleness`: the store is unreachable, so a
task revoked through another replica could be missing here. A stale replica refuses to issue
(503, audited) rather than risk serving a revoked task; sidecars keep serving what they hold.

Only an authenticated, audited lift ever takes a revocation away. A re-read that finds fewer
revocations than this replica holds is not news of lifts: a `FLUSHALL`, a restart without
persistence, a failover to a lagging replica or a restore from a backup looks exactly like
that. A revocation missing from the store is dropped only when a lift's signed tombstone
covers it; otherwise the replica keeps it, says so (log, metric, alert, audit record) and
writes it back (`on_lost`). Every error of the re-read loop is caught, counted and shown in
`/readyz`; the loop never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from metaproxy.broker.credentials.source import NOTHING_DROPPED, Dropped
from metaproxy.broker.store.base import (
    Revocation,
    RevocationEvent,
    RevocationSnapshot,
    RevocationStore,
    StoreUnavailable,
)
from metaproxy.clock import WaitingClock

log = logging.getLogger("metaproxy.broker.revocation")


def revocation_scope(tenant: str, task: str) -> str:
    """How a revocation names what it covers, in logs, audit reasons and answers."""
    return f"task {task} of tenant {tenant}" if task else f"tenant {tenant}"


async def _nothing_lost(_lost: list[Revocation]) -> None:
    return None


def _drop_nothing(_entry: Revocation) -> Dropped:
    return NOTHING_DROPPED


class RevocationView:
    def __init__(
        self,
        store: RevocationStore,
        clock: WaitingClock,
        *,
        max_staleness: float,
        resync_seconds: float,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_staleness = max_staleness
        self._resync_seconds = resync_seconds
        self._on_revoked: Callable[[Revocation], Dropped] = _drop_nothing
        self._on_lost: Callable[[list[Revocation]], Awaitable[None]] = _nothing_lost
        self._entries: dict[tuple[str, str], Revocation] = {}
        self._synced_at: float | None = None
        # Events that arrive while a snapshot is being read are applied again after it, so
        # a snapshot read just before a revoke cannot undo the revoke's push.
        self._during_snapshot: list[RevocationEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0
        self.resync_failures = 0
        self.restored = 0  # revocations the store had lost, kept and written back
        self.errors = 0  # unexpected failures of the re-read (a bug, a value we cannot use)
        self.last_error = ""
        store.subscribe(self._heard)

    def when_revoked(self, drop: Callable[[Revocation], Dropped]) -> None:
        """Call `drop` for each revocation this view learns of (its own, a push, a resync):
        the credential stack drops what it covers. Set once, by the broker's root, because the
        stack's guards ask this view in turn."""
        self._on_revoked = drop

    def when_lost(self, restore: Callable[[list[Revocation]], Awaitable[None]]) -> None:
        """Call `restore` with the revocations a re-read found missing from the store without a
        lift covering them: they stay in force here, and `restore` writes them back."""
        self._on_lost = restore

    async def start(self) -> None:
        """Load once (the replica is not ready until this works), then keep it fresh."""
        with contextlib.suppress(StoreUnavailable):
            await self._resync_once()
        self._task = asyncio.create_task(self._resync_loop(), name="revocation-resync")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def loaded(self) -> bool:
        return self._synced_at is not None

    @property
    def rejected(self) -> int:
        """Stored values and pushed messages refused (malformed, or not signed by the fleet)."""
        return self._store.rejected

    def age(self) -> float:
        """Seconds since the view last matched the store (infinite before the first load)."""
        if self._synced_at is None:
            return float("inf")
        return self._clock.monotonic() - self._synced_at

    def stale(self) -> bool:
        return self.age() > self._max_staleness

    def problem(self) -> str:
        """Why this view cannot be trusted now, in one line for /readyz; "" when it can."""
        if self._synced_at is None:
            return "revocations not loaded (store unreachable)"
        if self.stale():
            why = f" (last error: {self.last_error})" if self.last_error else ""
            return f"revocations not re-read for {self.age():.0f}s{why}: refusing to issue"
        return ""

    def check(self, tenant: str, task: str) -> str:
        """Why (tenant, task) is refused, or "" if it is not revoked."""
        for key in ((tenant, task), (tenant, "")):
            entry = self._entries.get(key)
            if entry is not None:
                return f"{revocation_scope(entry.tenant, entry.task)} revoked at {entry.at}"
        return ""

    def entries(self) -> list[Revocation]:
        return sorted(self._entries.values(), key=lambda e: (e.tenant, e.task))

    async def resync(self) -> None:
        """Re-read the store now (the loop does it every `resync_seconds`)."""
        await self._resync_once()

    async def _resync_once(self) -> None:
        self._during_snapshot = []
        try:
            snapshot = await self._store.snapshot()
        except StoreUnavailable:
            self.resync_failures += 1
            raise
        finally:
            late, self._during_snapshot = self._during_snapshot, None
        lost = self._merge(snapshot)
        self._synced_at = self._clock.monotonic()
        self.resyncs += 1
        for event in late or ():
            self._apply(event)
        if lost:
            self.restored += len(lost)
            log.error(
                "the store lost %d revocation(s) this replica holds (%s): kept in force and "
                "written back; a store that loses data must not lift anything",
                len(lost),
                ", ".join(revocation_scope(e.tenant, e.task) for e in lost[:5]),
            )
            await self._on_lost(lost)

    def _merge(self, snapshot: RevocationSnapshot) -> list[Revocation]:
        """Take the store's set, keeping what it lost; returns the lost ones."""
        fresh = {entry.key: entry for entry in snapshot.revocations}
        lost = []
        for key, held in self._entries.items():
            if key in fresh:
                continue
            lift = snapshot.lifts.get(key)
            if lift is not None and lift.covers(held):
                log.info("revocation lifted while its push was missed: %s", key)
                continue
            lost.append(held)
        added = [entry for key, entry in fresh.items() if key not in self._entries]
        self._entries = {**fresh, **{entry.key: entry for entry in lost}}
        for entry in added:
            log.warning("revocation found at resync (its push was missed): %s", entry.key)
            self._on_revoked(entry)
        return lost

    def apply(self, event: RevocationEvent) -> Dropped:
        """Apply a change made through this replica before its push comes back; returns what
        a revocation dropped here (its push, an echo, then finds it known and drops nothing)."""
        return self._apply(event)

    def _heard(self, event: RevocationEvent) -> None:
        """A change pushed by the store (any replica's, this one's own echo included)."""
        self._apply(event)

    def _apply(self, event: RevocationEvent) -> Dropped:
        if self._during_snapshot is not None:
            self._during_snapshot.append(event)
        entry = event.revocation
        if event.action == "revoke":
            known = self._entries.get(entry.key)
            self._entries[entry.key] = entry
            return self._on_revoked(entry) if known != entry else NOTHING_DROPPED
        held = self._entries.get(entry.key)
        # A lift takes away what it covers: never a revocation made after it.
        if held is not None and (event.lift is None or event.lift.covers(held)):
            del self._entries[entry.key]
        return NOTHING_DROPPED

    async def _resync_loop(self) -> None:
        while True:
            await self._clock.sleep(self._resync_seconds)
            try:
                await self._resync_once()
                self.last_error = ""
            except StoreUnavailable:
                if self.stale():
                    log.warning(
                        "revocations not re-read for %.0fs (store unreachable): refusing issuance",
                        self.age(),
                    )
            except Exception as exc:  # a bug must not stop revocations for good
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.exception("revocation re-read failed; retrying")
