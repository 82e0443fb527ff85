"""Credential sets shared by the replicas, and one STS call per key for the whole fleet.

Under each replica's own `CredentialCache` (which coalesces callers within the replica), this
layer makes two replicas asked for the same (role, session, scope) at once share one AssumeRole:
the first takes a short lease on the key in the store and calls STS; the others wait for the
lease's release (pushed by the store) and read the set it left. A holder that dies (kill -9)
stops extending its lease; the lease ends within `LEASE_SECONDS` and a waiter takes over.

Sets are sealed (AES-GCM, `store/sealing.py`) before they reach the store and expire from it
`SERVE_FLOOR_SECONDS` before the credentials do, so the store never holds a secret in the clear
and never a set a sidecar would refuse. If the store does not answer, the replica calls STS
itself: the fleet then costs at most one call per replica per key, never a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from metaproxy.background import BackgroundTasks
from metaproxy.broker.store.base import CacheClaim, CacheLook, SharedCache, StoreUnavailable
from metaproxy.broker.store.sealing import SealedValueInvalid, Sealer
from metaproxy.broker.sts import AssumedRole
from metaproxy.clock import Clock, iso_z
from metaproxy.errors import Denied
from metaproxy.models import Credentials

log = logging.getLogger("metaproxy.broker.cache")

# Sidecars never hand out credentials with less than 15 minutes left (min_serve_seconds).
SERVE_FLOOR_SECONDS = 900.0
LEASE_SECONDS = 5.0
# A waiter gives up on other replicas after this and calls STS itself.
MAX_WAIT_SECONDS = 30.0
# The fill (seal, then one store command) waits this long, so that the request whose STS call
# it stores answers first: a task started when the call returns runs before the request's own
# coroutine resumes, and put ~0.2 ms of sealing and sending in front of every cold answer.
# Waiters on other replicas get the set this much later, next to an STS call of ~50-100 ms.
FILL_AFTER_SECONDS = 0.002

CacheKey = tuple[object, ...]


def key_digest(key: CacheKey) -> str:
    """The store's name for a cache key: a digest, so a store dump names no session."""
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()


def owner_names(tenant: str, task: str) -> list[str]:
    """The revocation scopes a set belongs to: its tenant, and its task within the tenant."""
    return [f"{tenant}\x00", f"{tenant}\x00{task}"]


class SharedCredentials:
    def __init__(
        self,
        store: SharedCache,
        sealer: Sealer,
        clock: Clock,
        *,
        holder: str,
        refresh_fraction: float,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._clock = clock
        self._holder = holder
        self._refresh_fraction = refresh_fraction
        self._background = BackgroundTasks("shared-cache fill")
        self.shared_hits = 0  # sets another replica fetched
        self.waits = 0
        self.fallbacks = 0

    def claim_for(self, key: CacheKey) -> CacheClaim:
        """The question `fetch` asks first, for the store to answer along with the admission."""
        return CacheClaim(key_digest(key), self._holder, LEASE_SECONDS)

    async def fetch(
        self,
        key: CacheKey,
        owners: list[str],
        assume_role: Callable[[], Awaitable[AssumedRole]],
        first: CacheLook | None = None,
    ) -> AssumedRole:
        """`first`: the answer to `claim_for(key)` if the admission already brought it."""
        digest = key_digest(key)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + MAX_WAIT_SECONDS
        try:
            look = first or await self._store.get_or_claim(digest, self._holder, LEASE_SECONDS)
            while True:
                found, due = self._open(digest, look.value)
                if found is not None and not due:
                    self.shared_hits += 1
                    return found
                holding = look.holding
                if found is not None and not holding:
                    # Due for a refresh: this caller makes it, unless a replica already is;
                    # then the set it found, still well above the floor, is the answer.
                    refresh = await self._store.get_or_claim(
                        digest, self._holder, LEASE_SECONDS, claim_if_present=True
                    )
                    if not refresh.holding:
                        self.shared_hits += 1
                        return found
                    holding = True
                if holding:
                    return await self._fetch_as_holder(digest, owners, assume_role, found)
                if loop.time() > give_up_at:
                    log.warning("waited %.0fs for another replica's STS call", MAX_WAIT_SECONDS)
                    return await assume_role()
                self.waits += 1
                await self._store.wait(digest, seconds=LEASE_SECONDS)
                look = await self._store.get_or_claim(digest, self._holder, LEASE_SECONDS)
        except StoreUnavailable:
            self.fallbacks += 1
            return await assume_role()

    async def _fetch_as_holder(
        self,
        digest: str,
        owners: list[str],
        assume_role: Callable[[], Awaitable[AssumedRole]],
        due: AssumedRole | None,
    ) -> AssumedRole:
        # The lease outlives a fast call without help; only a slow one (STS retrying) needs
        # extending, so the keeper starts when a third of the lease has gone by.
        loop = asyncio.get_running_loop()
        keeper: list[asyncio.Task[None]] = []
        timer = loop.call_later(
            LEASE_SECONDS / 3,
            lambda: keeper.append(loop.create_task(self._keep_lease(digest))),
        )
        role: AssumedRole | None = None
        try:
            role = await assume_role()
            return role
        except Denied:
            raise  # revoked while it was fetched: nothing is served, and nothing stored
        except Exception:
            # STS failed: a set in the store past its refresh point (not its floor) is what
            # this replica serves, as it would from its own cache.
            if due is not None:
                return due
            raise
        finally:
            timer.cancel()
            for task in keeper:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Storing the set and releasing the lease (which wakes the other replicas'
            # waiters) follow in one round trip, in the background, after the caller's answer.
            self._background.spawn(self._fill_quietly(digest, owners, role))

    def drop_task(self, tenant: str, task: str) -> None:
        """Drop a revoked task's sets from the fleet's cache (in the background): one another
        replica filled after the revocation's own drop, before it heard of it."""
        self._background.spawn(self._drop_quietly(owner_names(tenant, task)[1 if task else 0]))

    async def _drop_quietly(self, owner: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._store.drop_owner(owner)

    def let_go(self, key: CacheKey) -> None:
        """Give back a lease this replica took for `key` and will not use (in the background)."""
        self._background.spawn(self._fill_quietly(key_digest(key), [], None))

    async def _fill_quietly(self, digest: str, owners: list[str], role: AssumedRole | None) -> None:
        await asyncio.sleep(FILL_AFTER_SECONDS)
        with contextlib.suppress(StoreUnavailable):
            await self._fill(digest, owners, role)

    async def aclose(self) -> None:
        """Let the last fills reach the store (their leases would otherwise run out)."""
        await self._background.aclose()

    async def _fill(self, digest: str, owners: list[str], role: AssumedRole | None) -> None:
        """Store the new set (if there is one worth storing) and give the lease back."""
        value: bytes | None = None
        ttl = 0.0
        if role is not None:
            ttl = role.credentials.seconds_left(self._clock.now()) - SERVE_FLOOR_SECONDS
            if ttl > 1:
                value = self._seal(digest, role)
        await self._store.fill(digest, self._holder, value, ttl, owners)

    async def _keep_lease(self, digest: str) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            with contextlib.suppress(StoreUnavailable):
                await self._store.extend(digest, self._holder, LEASE_SECONDS)

    def _open(self, digest: str, value: bytes | None) -> tuple[AssumedRole | None, bool]:
        """The set in `value` (None if absent, unopenable or at its floor) and whether it is
        due for a refresh."""
        if value is None:
            return None, False
        try:
            record = json.loads(self._sealer.open(value, bound_to=digest))
            role = AssumedRole(
                Credentials(
                    access_key_id=record["access_key_id"],
                    secret_access_key=record["secret_access_key"],
                    session_token=record["session_token"],
                    expiration=datetime.fromisoformat(record["expiration"]),
                ),
                record["assumed_role_arn"],
            )
            refresh_at = datetime.fromisoformat(record["refresh_at"])
        except (SealedValueInvalid, ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a shared credential set that does not open (%s)", exc)
            return None, False
        now = self._clock.now()
        if role.credentials.seconds_left(now) <= SERVE_FLOOR_SECONDS:
            return None, False
        return role, now >= refresh_at

    def _seal(self, digest: str, role: AssumedRole) -> bytes:
        now = self._clock.now()
        lifetime = role.credentials.seconds_left(now)
        record = {
            "access_key_id": role.credentials.access_key_id,
            "secret_access_key": role.credentials.secret_access_key,
            "session_token": role.credentials.session_token,
            "expiration": role.credentials.expiration.isoformat(),
            "assumed_role_arn": role.assumed_role_arn,
            "fetched_at": iso_z(now),
            "refresh_at": (now + timedelta(seconds=lifetime * self._refresh_fraction)).isoformat(),
        }
        return self._sealer.seal(json.dumps(record).encode(), bound_to=digest)

    def stats(self) -> dict[str, float]:
        return {
            "shared_cache_hit": float(self.shared_hits),
            "shared_cache_wait": float(self.waits),
            "shared_cache_fallback": float(self.fallbacks),
        }
