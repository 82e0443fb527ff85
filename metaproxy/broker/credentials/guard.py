"""A revocation check between two layers of the credential stack.

A task revoked while its request waited (in the queue, for the budget, for another replica's
call, at STS) must get nothing minted for it, and nothing fetched for it may be stored. So the
stack checks again on the way up, once below each cache: under `FleetCache` (before a set of
this replica's call reaches the fleet's store) and under `LocalCache` (before a set, this
replica's or another's, reaches this replica's cache). A refused set raises
`RevokedWhileFetching`; the guard above the fleet's cache also has the fleet's copies purged
(`on_refused`), in case another replica filled them before it heard of the revocation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from metaproxy.broker.credentials.source import CredentialSource, Fetch, Fetched, Scope
from metaproxy.broker.store.base import CacheClaim
from metaproxy.errors import RevokedWhileFetching


class RevocationCheck(Protocol):
    def check(self, tenant: str, task: str) -> str:
        """Why (tenant, task) is revoked, or "" if it is not."""
        ...

    def stale(self) -> bool:
        """Whether this replica can no longer tell (its view is too old to trust)."""
        ...


def _nothing(_scope: Scope) -> None:
    return None


class RevocationGuard:
    def __init__(
        self,
        inner: CredentialSource,
        revocations: RevocationCheck,
        *,
        on_refused: Callable[[Scope], None] = _nothing,
    ) -> None:
        self._inner = inner
        self._revocations = revocations
        self._on_refused = on_refused

    def claim(self, fetch: Fetch) -> CacheClaim | None:
        return self._inner.claim(fetch)

    def release(self, fetch: Fetch) -> None:
        self._inner.release(fetch)

    def drop(self, scope: Scope) -> int:
        return self._inner.drop(scope)

    async def get(self, fetch: Fetch) -> Fetched:
        fetched = await self._inner.get(fetch)
        revoked = self._revocations.check(fetch.tenant, fetch.task)
        if revoked or self._revocations.stale():
            self._on_refused(Scope(fetch.tenant, fetch.task))
            raise RevokedWhileFetching(revoked or "revocations stale")
        return fetched
