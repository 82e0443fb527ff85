"""The shared credential cache in the store: sealed sets and the single-flight lease."""

from __future__ import annotations

import asyncio
import contextlib

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.redis_keys import FLIGHT_CHANNEL, cache_key, lease_key, ms, owner_key
from metaproxy.broker.store.redis_link import StoreLink


class RedisCache:
    def __init__(self, conn: StoreLink) -> None:
        self._conn = conn
        self._get_or_claim = conn.script(scripts.GET_OR_CLAIM)
        self._fill = conn.script(scripts.FILL)
        self._extend = conn.script(scripts.EXTEND_LEASE)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def get_or_claim(
        self, key: str, holder: str, ttl_seconds: float, *, claim_if_present: bool = False
    ) -> tuple[bytes | None, bool]:
        value, taken = await self._conn.run(
            lambda: self._get_or_claim(
                keys=[cache_key(key), lease_key(key)],
                args=[holder, ms(ttl_seconds), "1" if claim_if_present else "0"],
            )
        )
        return (value or None), bool(taken)

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
            # One round trip: the owners' index (other slots on a Cluster) rides in the same
            # pipeline as the script that stores the value and releases the lease. A Cluster
            # client runs no script in a pipeline, so there it is a second round trip.
            cluster = self._conn.url.topology == "cluster"
            pipe = self._conn.client.pipeline(transaction=False)
            if value is not None:
                for owner in owners:
                    pipe.sadd(owner_key(owner), key)
                    # The index lives as long as the longest value in it could.
                    pipe.pexpire(owner_key(owner), ttl_ms, gt=True)
                    pipe.pexpire(owner_key(owner), ttl_ms, nx=True)
            fill = {
                "keys": [cache_key(key), lease_key(key)],
                "args": [holder, value or b"", ttl_ms, FLIGHT_CHANNEL, key],
            }
            if not cluster:
                # Queued in the pipeline (with the script loaded first if the store lacks it).
                await self._fill(**fill, client=pipe)
            await pipe.execute()
            if cluster:
                await self._fill(**fill)

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
