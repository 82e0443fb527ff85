"""The fleet store on Valkey or Redis: every replica of the broker shares it.

Each part falls back on its own when the store does not answer (see docs/fleet.md): the budget
and the tenant limits to this replica's share (1 / the live replicas it last saw), the cache to
this replica's own, the revocation view to what it holds until it is too stale to trust. The
parts live in their own modules (redis_revocations, redis_budget, redis_admissions, redis_cache,
redis_registry); this one connects them and carries the store's pushes to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Literal

from metaproxy.broker.store.base import StoreUnavailable
from metaproxy.broker.store.redis_admissions import RedisAdmissions
from metaproxy.broker.store.redis_budget import RedisBudget
from metaproxy.broker.store.redis_cache import RedisCache
from metaproxy.broker.store.redis_conn import StoreUrl
from metaproxy.broker.store.redis_keys import FLIGHT_CHANNEL, REVOCATION_CHANNEL
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.redis_registry import RedisRegistry
from metaproxy.broker.store.redis_revocations import RedisRevocations
from metaproxy.broker.store.signing import RevocationSigner

log = logging.getLogger("metaproxy.broker.store")


class RedisStore:
    kind: Literal["memory", "redis"] = "redis"

    def __init__(
        self, url: StoreUrl, *, timeout: float, signer: RevocationSigner, budget_per_second: float
    ) -> None:
        loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731
        self._conn = StoreLink(url, timeout, loop_time)
        self.revocations = RedisRevocations(self._conn, signer)
        self.replicas = RedisRegistry(self._conn)
        self.budget = RedisBudget(self._conn, self.replicas, budget_per_second)
        self.cache = RedisCache(self._conn)
        self.admissions = RedisAdmissions(
            self._conn, self.replicas, self.budget.terms, self.cache.releases
        )
        self._listener: asyncio.Task[None] | None = None
        self.push_connected = asyncio.Event()
        self.push_errors = 0

    @property
    def up(self) -> bool:
        return self._conn.up

    async def start(self) -> None:
        """Connect and subscribe. A store that is down now is not fatal: the replica starts,
        stays unready until it has read the revocations, and the loops reconnect."""
        self._listener = asyncio.create_task(self._listen(), name="store-push")
        try:
            await self._conn.run(self._conn.client.ping, probe=True)
        except StoreUnavailable:
            log.warning("store %s unreachable at start; retrying", self._conn.url.redacted())
            return
        # Pushes sent before we subscribed are covered by the first snapshot, taken after this.
        try:
            async with asyncio.timeout(5.0):
                await self.push_connected.wait()
        except TimeoutError:
            log.warning("store push channel not connected yet; relying on resync")

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        backoff = 0.1
        while True:
            pubsub = self._conn.pubsub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL, FLIGHT_CHANNEL)
                self.push_connected.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        await pubsub.ping()  # a dead connection shows itself here
                        continue
                    try:
                        self._dispatch(message)
                    except Exception:
                        # A message we cannot handle is one message lost (the resync is the
                        # backstop), never the channel.
                        self.push_errors += 1
                        log.exception("store push: a message could not be handled")
            except (RedisError, OSError, TimeoutError) as exc:
                self.push_connected.clear()
                log.warning("store push channel lost (%s); reconnecting", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        data = message["data"]
        data = data if isinstance(data, bytes) else str(data).encode()
        if channel == REVOCATION_CHANNEL:
            self.revocations.deliver(data)
        elif channel == FLIGHT_CHANNEL:
            self.cache.deliver(data)

    async def aclose(self) -> None:
        await self.admissions.aclose()  # slots handed back in the background reach the store
        await self.budget.aclose()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for client in (self._conn.client, self._conn.pubsub_client):
            with contextlib.suppress(Exception):
                await client.aclose()
