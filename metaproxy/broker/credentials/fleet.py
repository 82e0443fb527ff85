"""Credential sets shared by the replicas, and one STS call per key for the whole fleet.

Under each replica's own `LocalCache` (which coalesces callers within the replica), this layer
makes two replicas asked for the same (role, session, scope) at once share one AssumeRole:
the first takes a short lease on the key in the store and calls STS; the others wait for the
lease's release (pushed by the store) and read the set it left. A holder that dies (kill -9)
stops extending its lease; the lease ends within `LEASE_SECONDS` and a waiter takes over.

Sets are sealed (AES-GCM, `store/sealing.py`) before they reach the store and expire from it
`SERVE_FLOOR_SECONDS` before the credentials do, so the store never holds a secret in the clear
and never a set a sidecar would refuse. If the store does not answer, the replica calls STS
itself: the fleet then costs at most one call per replica per key, never a failed request.

A cold request's first question (`claim`) is asked along with its admission where the store
can (one round trip for both); its answer comes back in the request's `Ticket.look`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from metaproxy.background import BackgroundTasks
from metaproxy.broker.credentials.source import (
    SERVE_FLOOR_SECONDS,
    CredentialSource,
    Fetch,
    Fetched,
    Scope,
)
from metaproxy.broker.credentials.sts import AssumedRole
from metaproxy.broker.store.base import CacheClaim, SharedCache, StoreUnavailable
from metaproxy.broker.store.sealing import SealedValueInvalid, Sealer
from metaproxy.clock import Clock, iso_z
from metaproxy.errors import Denied
from metaproxy.models import Credentials

log = logging.getLogger("metaproxy.broker.cache")

LEASE_SECONDS = 5.0
# A waiter gives up on other replicas after this and calls STS itself.
MAX_WAIT_SECONDS = 30.0
# The fill (seal, then one store command) waits this long, so that the request whose STS call
# it stores answers first: a task started when the call returns runs before the request's own
# coroutine resumes, and put ~0.2 ms of sealing and sending in front of every cold answer.
# Waiters on other replicas get the set this much later, next to an STS call of ~50-100 ms.
FILL_AFTER_SECONDS = 0.002
# A set that does not open is logged once in this long (a key rotation done in one step makes
# every cold request meet one), and counted always.
WARN_EVERY_SECONDS = 60.0


NAMES_PURPOSE = "cache-names"


class StoreNames:
    """What the store files sets and their owners under: keyed digests (HMAC-SHA256 under a
    subkey of the store key), so a store dump names no session, and a store reader cannot test
    a guess ("is acme's app role cached for task 7?") by hashing it.

    The first key of --store-key-file names, as it seals: while a rotation's second phase rolls
    out, replicas that disagree on the first line file under different names (each fetches its
    own, once per key), never under the same name with different contents."""

    def __init__(self, sealer: Sealer) -> None:
        self._key = sealer.derive(NAMES_PURPOSE)[0]

    def _digest(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def of(self, fetch: Fetch) -> str:
        return self._digest(json.dumps(fetch.key, default=str))

    def owner(self, tenant: str, task: str) -> str:
        """The index a set is filed under for its tenant (task "") or one task of it."""
        return self._digest(f"{tenant}\x00{task}")

    def owners_of(self, fetch: Fetch) -> list[str]:
        return [self.owner(fetch.tenant, ""), self.owner(fetch.tenant, fetch.task)]


@dataclass(frozen=True, slots=True)
class FleetCacheStats:
    hits: int  # sets another replica fetched
    waits: int  # waits for another replica's call
    fallbacks: int  # the store did not answer: this replica called STS itself
    unopenable: int  # sets that did not open here (another key, tampering): replaced


class FleetCache:
    def __init__(
        self,
        inner: CredentialSource,
        store: SharedCache,
        sealer: Sealer,
        clock: Clock,
        *,
        holder: str,
        refresh_fraction: float,
    ) -> None:
        self._inner = inner
        self._store = store
        self._sealer = sealer
        self._names = StoreNames(sealer)
        self._clock = clock
        self._holder = holder
        self._refresh_fraction = refresh_fraction
        self._background = BackgroundTasks("shared-cache fill")
        self._hits = 0
        self._waits = 0
        self._fallbacks = 0
        self._unopenable = 0
        self._warned_at = -WARN_EVERY_SECONDS

    def stats(self) -> FleetCacheStats:
        return FleetCacheStats(self._hits, self._waits, self._fallbacks, self._unopenable)

    def claim(self, fetch: Fetch) -> CacheClaim:
        return CacheClaim(self._names.of(fetch), self._holder, LEASE_SECONDS)

    def release(self, fetch: Fetch) -> None:
        look = fetch.ticket.look
        if look is not None and look.holding:
            # Other replicas would otherwise wait the lease out before calling STS themselves.
            self._background.spawn(self._fill_quietly(self._names.of(fetch), [], None))
        self._inner.release(fetch)

    def drop(self, scope: Scope) -> int:
        """Nothing to drop here: the sets are in the store, purged once by the replica that
        revoked (`purge`), and by the guard above when it refuses one filled meanwhile."""
        return self._inner.drop(scope)

    async def purge(self, scope: Scope) -> int:
        """Delete the store's sets `scope` covers; returns how many went."""
        return await self._store.drop_owner(self._names.owner(scope.tenant, scope.task))

    def purge_later(self, scope: Scope) -> None:
        self._background.spawn(self._purge_quietly(scope))

    async def _purge_quietly(self, scope: Scope) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.purge(scope)

    async def get(self, fetch: Fetch) -> Fetched:
        digest = self._names.of(fetch)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + MAX_WAIT_SECONDS
        try:
            look = fetch.ticket.look or await self._store.get_or_claim(
                digest, self._holder, LEASE_SECONDS
            )
            while True:
                found, due = self._open(digest, look.value)
                if found is not None and not due:
                    return self._hit(fetch, found)
                holding = look.holding
                if look.value is not None and not holding:
                    # Due for a refresh, or a value this replica cannot use (sealed under a key
                    # it does not have, tampered with): this caller replaces it, unless a
                    # replica already is. A set found due, still well above the floor, is the
                    # answer meanwhile; a value that does not open is a miss, never a wait.
                    refresh = await self._store.get_or_claim(
                        digest, self._holder, LEASE_SECONDS, claim_if_present=True
                    )
                    if not refresh.holding and found is not None:
                        return self._hit(fetch, found)
                    holding = refresh.holding
                if holding:
                    return await self._fetch_as_holder(digest, fetch, found)
                if loop.time() > give_up_at:
                    log.warning("waited %.0fs for another replica's STS call", MAX_WAIT_SECONDS)
                    return await self._inner.get(fetch)
                self._waits += 1
                await self._store.wait(digest, seconds=LEASE_SECONDS, after=look.releases_seen)
                look = await self._store.get_or_claim(digest, self._holder, LEASE_SECONDS)
        except StoreUnavailable:
            self._fallbacks += 1
            return await self._inner.get(fetch)

    def _hit(self, fetch: Fetch, found: Fetched) -> Fetched:
        self._hits += 1
        self._inner.release(fetch)  # no call below: a budget slot it brought goes back
        return found

    async def _fetch_as_holder(self, digest: str, fetch: Fetch, due: Fetched | None) -> Fetched:
        # The lease outlives a fast call without help; only a slow one (STS retrying) needs
        # extending, so the keeper starts when a third of the lease has gone by.
        loop = asyncio.get_running_loop()
        keeper: list[asyncio.Task[None]] = []
        timer = loop.call_later(
            LEASE_SECONDS / 3,
            lambda: keeper.append(loop.create_task(self._keep_lease(digest))),
        )
        fetched: Fetched | None = None
        try:
            fetched = await self._inner.get(fetch)
            return fetched
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
            role = fetched.role if fetched is not None else None
            self._background.spawn(self._fill_quietly(digest, self._names.owners_of(fetch), role))

    async def _fill_quietly(self, digest: str, owners: list[str], role: AssumedRole | None) -> None:
        await asyncio.sleep(FILL_AFTER_SECONDS)
        with contextlib.suppress(StoreUnavailable):
            await self._fill(digest, owners, role)

    async def start(self) -> None:
        return None  # nothing runs until a request comes

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

    def _open(self, digest: str, value: bytes | None) -> tuple[Fetched | None, bool]:
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
            fetched_at = datetime.fromisoformat(record["fetched_at"])
            refresh_at = datetime.fromisoformat(record["refresh_at"])
        except (SealedValueInvalid, ValueError, KeyError, TypeError) as exc:
            self._unopenable += 1
            moment = self._clock.monotonic()
            if moment - self._warned_at > WARN_EVERY_SECONDS:
                self._warned_at = moment
                log.warning(
                    "a shared credential set does not open (%s): fetched again and replaced; "
                    "a replica without every key of --store-key-file? (%d so far)",
                    type(exc).__name__,
                    self._unopenable,
                )
            return None, False
        now = self._clock.now()
        if role.credentials.seconds_left(now) <= SERVE_FLOOR_SECONDS:
            return None, False
        return Fetched(role, "fleet", fetched_at), now >= refresh_at

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
