"""The one interface of the credential path, and the values that travel down and up it.

Every layer is a `CredentialSource` wrapping the one below, composed once when the broker
starts (`broker/process.py`):

    LocalCache → RevocationGuard → FleetCache → RevocationGuard → Scheduler → STS

A request goes down as a `Fetch` and comes back as a `Fetched`. What the fleet's one-round-trip
admission brought along (the shared cache's answer and lease, an STS budget slot) rides in the
`Fetch`'s `Ticket`, and only the layer that can use a part reads it. A layer that is not there
(no shared store: no `FleetCache`) is simply not in the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, Protocol

from metaproxy.broker.credentials.sts import AssumedRole
from metaproxy.broker.store.base import NO_TICKET, CacheClaim, Ticket
from metaproxy.models import AssumeRoleSpec

Priority = Literal["cold", "refresh"]
# Sidecars never hand out credentials with less than 15 minutes left (their min_serve_seconds,
# the SDKs' own "about to expire"): the broker never serves a cached set that close to its end.
SERVE_FLOOR_SECONDS = 900.0
# Where a set came from: this replica's cache ("cache"; "stale" while STS fails and the set is
# still valid), a call in flight for another request ("coalesced"), another replica's call
# through the fleet's shared cache ("fleet"), or a call of this request's own ("sts").
Origin = Literal["cache", "stale", "coalesced", "fleet", "sts"]


@dataclass(frozen=True, slots=True)
class Scope:
    """What a revocation covers: one task of a tenant, or (task == "") every task of it."""

    tenant: str
    task: str = ""

    def covers(self, tenant: str, task: str) -> bool:
        return tenant == self.tenant and (not self.task or task == self.task)


@dataclass(frozen=True, slots=True)
class Fetch:
    """One request for a credential set, as it goes down the stack."""

    spec: AssumeRoleSpec
    tenant: str
    task: str
    priority: Priority = "cold"
    ticket: Ticket = NO_TICKET

    @property
    def key(self) -> tuple[object, ...]:
        return self.spec.cache_key

    def as_refresh(self) -> Fetch:
        return replace(self, priority="refresh")


@dataclass(frozen=True, slots=True)
class Fetched:
    """A credential set, where it came from, and when it was fetched from STS."""

    role: AssumedRole
    origin: Origin
    fetched_at: datetime
    # This replica had already issued this set's key to the same task: a refresh, whatever
    # the request said of itself.
    renewal: bool = False


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a revocation dropped from this replica: how many sets, of which roles."""

    sets: int
    roles: tuple[str, ...] = ()


NOTHING_DROPPED = Dropped(0)


class CredentialSource(Protocol):
    def claim(self, fetch: Fetch) -> CacheClaim | None:
        """The question this layer (or one below) will ask the fleet's store first, if the
        request will get that far: asked along with the admission, one round trip for both."""
        ...

    async def get(self, fetch: Fetch) -> Fetched: ...

    def release(self, fetch: Fetch) -> None:
        """Give back what `fetch.ticket` holds for this layer or one below, when the request
        will not use it (served from above, or refused after its admission)."""
        ...

    def drop(self, scope: Scope) -> int:
        """Forget the sets `scope` covers and stop their fetches in flight (a revocation);
        returns how many sets went from this replica. Idempotent."""
        ...
