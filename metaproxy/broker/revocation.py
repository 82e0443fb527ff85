"""This replica's view of the fleet's revocations, and how far it can be trusted.

The store holds them durably and pushes every change to every replica; a full re-read every
`--revocation-resync-seconds` is the backstop for a push that was lost. The view is *stale*
once no re-read has worked for `--revocation-max-staleness`: the store is unreachable, so a
task revoked through another replica could be missing here. A stale replica refuses to issue
(503, audited) rather than risk serving a revoked task; sidecars keep serving what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from metaproxy.broker.store.base import (
    Revocation,
    RevocationEvent,
    RevocationStore,
    StoreUnavailable,
)
from metaproxy.clock import Clock

log = logging.getLogger("metaproxy.broker.revocation")


def revocation_scope(tenant: str, task: str) -> str:
    """How a revocation names what it covers, in logs, audit reasons and answers."""
    return f"task {task} of tenant {tenant}" if task else f"tenant {tenant}"


class RevocationView:
    def __init__(
        self,
        store: RevocationStore,
        clock: Clock,
        *,
        max_staleness: float,
        resync_seconds: float,
        on_revoked: Callable[[Revocation], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_staleness = max_staleness
        self._resync_seconds = resync_seconds
        self._on_revoked = on_revoked
        self._entries: dict[tuple[str, str], Revocation] = {}
        self._synced_at: float | None = None
        # Events that arrive while a snapshot is being read are applied again after it, so
        # a snapshot read just before a revoke cannot undo the revoke's push.
        self._during_snapshot: list[RevocationEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0
        self.resync_failures = 0
        store.subscribe(self._apply)

    async def start(self) -> None:
        """Load once (the replica is not ready until this works), then keep it fresh."""
        with contextlib.suppress(StoreUnavailable):
            await self.resync()
        self._task = asyncio.create_task(self._resync_loop(), name="revocation-resync")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def loaded(self) -> bool:
        return self._synced_at is not None

    def age(self) -> float:
        """Seconds since the view last matched the store (infinite before the first load)."""
        if self._synced_at is None:
            return float("inf")
        return self._clock.monotonic() - self._synced_at

    def stale(self) -> bool:
        return self.age() > self._max_staleness

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
        self._during_snapshot = []
        try:
            snapshot = await self._store.snapshot()
        except StoreUnavailable:
            self.resync_failures += 1
            raise
        finally:
            late, self._during_snapshot = self._during_snapshot, None
        fresh = {entry.key: entry for entry in snapshot}
        added = [entry for key, entry in fresh.items() if key not in self._entries]
        self._entries = fresh
        self._synced_at = self._clock.monotonic()
        self.resyncs += 1
        for entry in added:
            log.warning("revocation found at resync (its push was missed): %s", entry.key)
            self._on_revoked(entry)
        for event in late or ():
            self._apply(event)

    def apply(self, event: RevocationEvent) -> None:
        """Apply a change made through this replica before its push comes back."""
        self._apply(event)

    def _apply(self, event: RevocationEvent) -> None:
        if self._during_snapshot is not None:
            self._during_snapshot.append(event)
        entry = event.revocation
        if event.action == "revoke":
            known = self._entries.get(entry.key)
            self._entries[entry.key] = entry
            if known != entry:
                self._on_revoked(entry)
        else:
            self._entries.pop(entry.key, None)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resync_seconds)
            try:
                await self.resync()
            except StoreUnavailable:
                if self.stale():
                    log.warning(
                        "revocations not re-read for %.0fs (store unreachable): refusing issuance",
                        self.age(),
                    )
