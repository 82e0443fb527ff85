"""The store seam: everything that must hold for the whole broker fleet goes through it.

A single broker (the default, and `make demo`) keeps it in process (`store/memory.py`); a fleet
of replicas shares it through Valkey or Redis (`store/redis_store.py`). Nothing else in the
broker knows which one is in use: it asks the `FleetStore` for its five parts, each a small
protocol with one concern.

- `RevocationStore`: durable revocations, pushed to every replica, with a full snapshot as the
  backstop (the broker's `RevocationView` decides staleness from when a snapshot last worked).
- `StsBudget`: the account's STS call budget, one for the fleet.
- `AdmissionStore`: a tenant's request rate and in-flight cap, the same with 1 or 12 replicas;
  an admission is a `Ticket`.
- `SharedCache`: sealed credential sets and the cross-replica single-flight lease (only
  where other processes share the store).
- `ReplicaRegistry`: heartbeats (how many replicas are live) and each replica's latest audit
  checkpoint, which the others witness.

Every method may raise `StoreUnavailable`; callers fall back to what they hold (see
docs/fleet.md for what each part does then).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from metaproxy.audit.checkpoint import WitnessedCheckpoint
from metaproxy.models import BrokerLimits


class StoreUnavailable(Exception):
    """The store did not answer (connection refused or reset, timeout, failover in progress).

    Not a `MetaproxyError`: it never reaches a client. Each caller decides what falling back
    means for its part (local budget share, local cache, stale revocation view)."""


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked task of a tenant, or (task == "") the whole tenant."""

    tenant: str
    task: str
    at: str  # ISO time of the revocation; the IAM deny cuts sessions issued before it
    by: str = ""  # who asked (the control client's address) and through which replica

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.task)


@dataclass(frozen=True, slots=True)
class Lift:
    """An authenticated, audited lift (through the control API): kept as a tombstone, so a
    replica that missed its push can tell a lifted revocation from one the store lost."""

    tenant: str
    task: str
    at: str  # ISO time of the lift; it covers revocations made at or before it
    by: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.task)

    def covers(self, revocation: Revocation) -> bool:
        return revocation.key == self.key and revocation.at <= self.at


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    action: Literal["revoke", "lift"]
    revocation: Revocation  # what was revoked, or what was lifted
    lift: Lift | None = None  # for a lift: who lifted it, and when


@dataclass(frozen=True, slots=True)
class RevocationSnapshot:
    """The durable copy: the revocations in force, the lifts' tombstones, and how many stored
    values were refused (malformed, or not signed with the fleet's key)."""

    revocations: list[Revocation]
    lifts: dict[tuple[str, str], Lift]
    rejected: int = 0


RevocationListener = Callable[[RevocationEvent], None]


class RevocationStore(Protocol):
    async def add(self, revocation: Revocation) -> None:
        """Durable before it returns, then pushed to every replica (this one included)."""
        ...

    async def remove(self, lift: Lift) -> Revocation | None:
        """Lift a revocation, leaving `lift` as its tombstone; returns what was lifted (None:
        there was none)."""
        ...

    async def snapshot(self) -> RevocationSnapshot:
        """Every revocation in force and every lift, read from the durable copy."""
        ...

    @property
    def rejected(self) -> int:
        """Pushed messages and stored values refused so far (malformed or unsigned)."""
        ...

    def subscribe(self, listener: RevocationListener) -> None:
        """Call `listener` for every revoke and lift, from any replica, as they happen."""
        ...


@dataclass(frozen=True, slots=True)
class BudgetStats:
    share_per_second: float  # AssumeRole calls per second this replica may make now
    fallback: bool = False  # the store is unreachable: this replica spends its share alone
    fallback_calls: int = 0  # calls made on the share
    store_asks: int = 0  # commands to the store for a slot, granted or told to wait


class StsBudget(Protocol):
    async def acquire(self) -> None:
        """Return when one AssumeRole call may be sent (the caller sends right after)."""
        ...

    def stats(self) -> BudgetStats: ...


@dataclass(frozen=True, slots=True)
class CacheLook:
    """What the shared cache holds under a key, whether the asker now holds its lease, and how
    many lease releases this replica had been told of when it asked (`SharedCache.wait`)."""

    value: bytes | None
    holding: bool
    releases_seen: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class CacheClaim:
    """A cold request's question to the shared cache (`SharedCache.get_or_claim` without
    `claim_if_present`), asked with its admission: one round trip where the store can."""

    key: str
    holder: str
    ttl_seconds: float


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted request's hold on the fleet, issued by the store with its admission.

    `slot` is the in-flight slot, handed back to `leave` when the request ends. Where the store
    answers everything in one round trip, the admission also brings `look`, the shared cache's
    answer to the request's `CacheClaim` (read by the fleet cache layer), and possibly
    `budget_due`, the event-loop time of an STS budget slot taken for its call (read by the
    STS caller). Each part is read by the one layer that uses it, and by no other."""

    slot: str
    look: CacheLook | None = None
    budget_due: float | None = None


NO_TICKET = Ticket("")


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of asking to start one request: admitted, or why not and for how long."""

    admitted: bool
    reason: str = ""  # "tenant-rate" | "identity-rate" | "in-flight"
    retry_after: float = 0.0
    ticket: Ticket = NO_TICKET  # an admitted request's hold on the fleet


class AdmissionStore(Protocol):
    async def enter(
        self, tenant: str, subject: str, limits: BrokerLimits, claim: CacheClaim | None = None
    ) -> Admission:
        """Take one request of the tenant's and the identity's rate, and an in-flight slot.
        With a `claim`, an admitted request may also get the shared cache's answer to it
        (`Ticket.look`) and a budget slot; a refused one never touches the cache."""
        ...

    async def leave(self, tenant: str, ticket: Ticket) -> None: ...

    async def aclose(self) -> None:
        """Hand back the slots of ended requests still on their way to the store."""
        ...


class SharedCache(Protocol):
    """Sealed credential sets by key digest, and a lease so one replica fetches a key at once.

    Values are opaque bytes here: `broker/shared_cache.py` seals them (AES-GCM) before they
    reach the store, so a store dump holds no secret. Each call is one round trip: a cold
    issue costs `get_or_claim` (asked with its admission where the store can: `CacheClaim`)
    and `fill`, whatever else the replicas are doing."""

    async def get_or_claim(
        self, key: str, holder: str, ttl_seconds: float, *, claim_if_present: bool = False
    ) -> CacheLook:
        """The value under `key`, and whether `holder` now has the single-flight lease (taken
        only when there is no value, or `claim_if_present`: the value is due for a refresh)."""
        ...

    async def fill(
        self,
        key: str,
        holder: str,
        value: bytes | None,
        ttl_seconds: float,
        owners: list[str],
    ) -> None:
        """Store `value` (unless None) for `ttl_seconds`, indexed under each owner (tenant,
        tenant/task); give the lease back and wake the replicas waiting on it."""
        ...

    async def extend(self, key: str, holder: str, ttl_seconds: float) -> bool: ...

    async def wait(self, key: str, seconds: float, *, after: int) -> None:
        """Return when the lease on `key` is released (or after `seconds`), at once if it was
        released after the look whose `releases_seen` is `after`: the push of a release can be
        read before the reply to the look that saw the lease held."""
        ...

    async def drop_owner(self, owner: str) -> int:
        """Delete every value indexed under `owner`; returns how many went."""
        ...


class ReplicaRegistry(Protocol):
    async def heartbeat(self, instance: str, ttl_seconds: float) -> list[str]:
        """Mark `instance` live for `ttl_seconds`; returns the live replicas (it included)."""
        ...

    def last_seen_live(self) -> int:
        """How many replicas were live at the last heartbeat that worked (at least 1)."""
        ...

    async def publish_checkpoint(self, instance: str, checkpoint: WitnessedCheckpoint) -> None: ...

    async def checkpoints(self) -> dict[str, WitnessedCheckpoint]:
        """The latest checkpoint each replica published, by instance."""
        ...


class FleetStore(Protocol):
    # Read-only members, so each implementation may hold its own concrete classes.
    @property
    def kind(self) -> Literal["memory", "redis"]: ...

    @property
    def revocations(self) -> RevocationStore: ...

    @property
    def admissions(self) -> AdmissionStore: ...

    @property
    def cache(self) -> SharedCache | None:
        """None when this process is the whole fleet: its own cache is then the shared one,
        and a second layer would only cost each cold issue a seal and a copy."""
        ...

    @property
    def replicas(self) -> ReplicaRegistry: ...

    @property
    def up(self) -> bool:
        """Whether the last command reached the store (always true in memory)."""
        ...

    @property
    def push_errors(self) -> int:
        """Pushed messages that could not be handled (none in memory: nothing is pushed)."""
        ...

    @property
    def budget(self) -> StsBudget:
        """The STS budget shared by every replica on this store."""
        ...

    async def start(self) -> None:
        """Connect (raises StoreUnavailable if the store cannot be reached at all)."""
        ...

    async def aclose(self) -> None: ...


Waiter = Callable[[], Awaitable[None]]
