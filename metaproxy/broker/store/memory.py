"""The in-process store: one broker, nothing to run beside it (the default, and `make demo`).

There is no shared cache layer: the broker's own cache and single flight are the fleet's.

Revocations persist under `--state-dir` (fsynced, renamed into place) so a restarted broker
still refuses what it refused; everything else is as short-lived as the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from metaproxy.audit.checkpoint import WitnessedCheckpoint
from metaproxy.broker.credentials.budget import budget_limiter
from metaproxy.broker.store.base import (
    Admission,
    BudgetStats,
    CacheClaim,
    Lift,
    Revocation,
    RevocationEvent,
    RevocationListener,
    RevocationSnapshot,
    StoreUnavailable,
    Ticket,
)
from metaproxy.errors import ConfigError
from metaproxy.fsutil import write_atomically
from metaproxy.models import BrokerLimits
from metaproxy.ratelimit import KeyedLimiter

log = logging.getLogger("metaproxy.broker.store")

REVOCATIONS_FILE = "revocations.json"


class MemoryRevocations:
    def __init__(self, state_dir: Path | None) -> None:
        self._path = state_dir / REVOCATIONS_FILE if state_dir is not None else None
        self._entries: dict[tuple[str, str], Revocation] = {}
        self._listeners: list[RevocationListener] = []
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read what an earlier run persisted; a damaged file is a ConfigError, not a reset."""
        if self._path is None or not self._path.exists():
            return
        try:
            raw = json.loads(self._path.read_text())
            entries = [Revocation(**item) for item in raw]
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"state_dir: {self._path} is unreadable ({exc})") from None
        self._entries = {entry.key: entry for entry in entries}

    async def add(self, revocation: Revocation) -> None:
        async with self._lock:
            entries = {**self._entries, revocation.key: revocation}
            await self._save(entries)
            self._entries = entries
        self._emit(RevocationEvent("revoke", revocation))

    async def remove(self, lift: Lift) -> Revocation | None:
        async with self._lock:
            lifted = self._entries.get(lift.key)
            if lifted is None:
                return None
            entries = {k: v for k, v in self._entries.items() if k != lift.key}
            await self._save(entries)
            self._entries = entries
        self._emit(RevocationEvent("lift", lifted, lift))
        return lifted

    async def snapshot(self) -> RevocationSnapshot:
        # One process: nothing else can lift, and what it holds it saved itself.
        return RevocationSnapshot(list(self._entries.values()), {})

    @property
    def rejected(self) -> int:
        return 0

    def subscribe(self, listener: RevocationListener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: RevocationEvent) -> None:
        # Delivered after the change returns, as a shared store's push is: the replica that
        # made it applies it to its view first (`Revoker`), and hears it again as an echo.
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.call_soon(listener, event)

    async def _save(self, entries: dict[tuple[str, str], Revocation]) -> None:
        if self._path is None:
            return
        data = json.dumps([asdict(e) for e in entries.values()], indent=1).encode()
        # Durable before the revocation is acknowledged; on a thread, as fsync blocks.
        try:
            await asyncio.to_thread(write_atomically, self._path, data)
        except OSError as exc:
            # A full or read-only --state-dir: nothing changed, and the caller says so (503,
            # audited), as it does for a shared store that does not answer.
            raise StoreUnavailable(f"cannot write {self._path}: {exc.strerror}") from None


class LocalBudget:
    """The budget for one process: aiolimiter's bucket paced at the call window's limit."""

    def __init__(self, calls_per_second: float) -> None:
        self.calls_per_second = calls_per_second
        self._limiter = budget_limiter(calls_per_second)
        self.acquired = 0

    async def acquire(self) -> None:
        await self._limiter.acquire()
        self.acquired += 1

    def stats(self) -> BudgetStats:
        return BudgetStats(share_per_second=self.calls_per_second)


class LocalAdmissions:
    """Per-tenant rate and in-flight caps, and a per-identity rate, in this process.

    `share` divides every rate and cap: a replica that lost the store holds its part of the
    fleet's limits (1 / the replicas it last saw), so the fleet stays within them."""

    def __init__(self) -> None:
        defaults = BrokerLimits()
        self._tenant_rate = KeyedLimiter(defaults.requests_per_second, defaults.burst)
        self._identity_rate = KeyedLimiter(
            defaults.per_identity_rps, defaults.per_identity_burst, max_keys=100_000
        )
        self._in_flight: defaultdict[str, set[str]] = defaultdict(set)

    async def enter(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> Admission:
        # No shared cache in process (FleetStore.cache is None): nobody sends a claim here.
        return self.enter_now(tenant, subject, limits)

    def enter_now(
        self, tenant: str, subject: str, limits: BrokerLimits, share: float = 1.0
    ) -> Admission:
        wait = self._tenant_rate.take(
            tenant,
            rate=limits.requests_per_second * share,
            burst=max(1.0, limits.burst * share),
        )
        if wait:
            return Admission(False, "tenant-rate", retry_after(wait))
        wait = self._identity_rate.take(
            (tenant, subject), rate=limits.per_identity_rps, burst=limits.per_identity_burst
        )
        if wait:
            return Admission(False, "identity-rate", retry_after(wait))
        slots = self._in_flight[tenant]
        if len(slots) >= max(1, math.floor(limits.max_in_flight * share)):
            return Admission(False, "in-flight", 1.0)
        slot = secrets.token_hex(8)
        slots.add(slot)
        return Admission(True, ticket=Ticket(slot))

    async def leave(self, tenant: str, ticket: Ticket) -> None:
        self.leave_now(tenant, ticket.slot)

    def leave_now(self, tenant: str, slot: str) -> None:
        slots = self._in_flight.get(tenant)
        if slots is not None:
            slots.discard(slot)
            if not slots:
                del self._in_flight[tenant]

    async def aclose(self) -> None:
        return None  # nothing on its way anywhere: slots are given back as requests end


def retry_after(seconds: float) -> float:
    return float(max(1, math.ceil(seconds)))


class MemoryRegistry:
    def __init__(self) -> None:
        self._checkpoints: dict[str, WitnessedCheckpoint] = {}

    async def heartbeat(self, instance: str, ttl_seconds: float) -> list[str]:
        return [instance]

    def last_seen_live(self) -> int:
        return 1

    async def publish_checkpoint(self, instance: str, checkpoint: WitnessedCheckpoint) -> None:
        self._checkpoints[instance] = checkpoint

    async def checkpoints(self) -> dict[str, WitnessedCheckpoint]:
        return dict(self._checkpoints)


class MemoryStore:
    kind: Literal["memory", "redis"] = "memory"

    def __init__(self, state_dir: Path | None = None, *, budget_per_second: float = 50.0) -> None:
        self.revocations = MemoryRevocations(state_dir)
        self.admissions = LocalAdmissions()
        self.cache = None  # one process: its own credential cache is the fleet's
        self.replicas = MemoryRegistry()
        self.budget = LocalBudget(budget_per_second)
        self._state_dir = state_dir

    up = True
    push_errors = 0

    async def start(self) -> None:
        if self._state_dir is None:
            log.warning(
                "no --state-dir: revocations are kept in memory only and end with this process"
            )
        else:
            try:
                self._state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"state_dir: cannot create {self._state_dir}: {exc}") from None
        self.revocations.load()

    async def aclose(self) -> None:
        return None
