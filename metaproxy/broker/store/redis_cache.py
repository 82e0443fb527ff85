"""The shared credential cache in the store: sealed sets and the single-flight lease."""

from __future__ import annotations

import asyncio
import contextlib

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import CacheLook
from metaproxy.broker.store.redis_keys import (
    FLIGHT_CHANNEL,
    cache_key,
    flight_keys,
    lease_key,
    ms,
    owner_key,
)
from metaproxy.broker.store.redis_link import StoreLink


class RedisCache:
    def __init__(self, conn: StoreLink) -> None:
        self._conn = conn
        self._get_or_claim = conn.script(scripts.GET_OR_CLAIM)
        self._fill = conn.script(scripts.FILL)
        self._fill_indexed = conn.script(scripts.FILL_INDEXED)
        self._extend = conn.script(scripts.EXTEND_LEASE)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def get_or_claim(
        self, key: str, holder: str, ttl_seconds: float, *, claim_if_present: bool = False
    ) -> CacheLook:
        value, taken = await self._conn.run(
            lambda: self._get_or_claim(
                keys=flight_keys(key),
                args=[holder, ms(ttl_seconds), "1" if claim_if_present else "0"],
            )
        )
        return CacheLook(value or None, bool(taken))

    async def fill(
        self,
        key: str,
        holder: str,
        value: bytes | None,
        ttl_seconds: float,
        owners: list[str],
    ) -> None:
        ttl_ms = ms(ttl_seconds)

        async def write() -> None:
            if self._conn.url.topology != "cluster":
                # One script: the set, the owners' index, the lease released, the waiters woken.
                await self._fill_indexed(
                    keys=[*flight_keys(key), *map(owner_key, owners)]
                    if value is not None
                    else flight_keys(key),
                    args=[holder, value or b"", ttl_ms, FLIGHT_CHANNEL, key],
                )
                return
            # A Cluster spreads the owner sets over other slots: index them in a pipeline,
            # then the script for the set and the lease, which share a hash tag.
            if value is not None:
                pipe = self._conn.client.pipeline(transaction=False)
                for owner in owners:
                    pipe.sadd(owner_key(owner), key)
                    pipe.pexpire(owner_key(owner), ttl_ms, gt=True)
                    pipe.pexpire(owner_key(owner), ttl_ms, nx=True)
                await pipe.execute()
            await self._fill(
                keys=flight_keys(key),
                args=[holder, value or b"", ttl_ms, FLIGHT_CHANNEL, key],
            )

        await self._conn.run(write)

    async def drop_owner(self, owner: str) -> int:
        async def drop() -> int:
            keys = await self._conn.client.smembers(owner_key(owner))
            dropped = 0
            for key in keys:
                dropped += int(await self._conn.client.delete(cache_key(key.decode())))
            await self._conn.client.delete(owner_key(owner))
            return dropped

        return await self._conn.run(drop)

    async def extend(self, key: str, holder: str, ttl_seconds: float) -> bool:
        done = await self._conn.run(
            lambda: self._extend(keys=[lease_key(key)], args=[holder, ms(ttl_seconds)])
        )
        return bool(done)

    async def wait(self, key: str, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(seconds):
                await future
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(future)
                if not waiting:
                    del self._waiters[key]

    def deliver(self, data: bytes) -> None:
        for future in self._waiters.pop(data.decode(errors="replace"), []):
            if not future.done():
                future.set_result(None)
