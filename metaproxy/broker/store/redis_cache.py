"""The shared credential cache in the store: sealed sets and the single-flight lease."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict

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

# Releases remembered per key for `wait`'s `after`; a look older than this many releases of
# other keys waits for its push like any other.
REMEMBERED_RELEASES = 4096


class Releases:
    """The lease releases this replica has been pushed, numbered: a look records the number it
    was asked at, and a wait after it returns at once for a key released since."""

    def __init__(self) -> None:
        self.seen = 0
        self._last: OrderedDict[str, int] = OrderedDict()

    def record(self, key: str) -> None:
        self.seen += 1
        self._last[key] = self.seen
        self._last.move_to_end(key)
        if len(self._last) > REMEMBERED_RELEASES:
            self._last.popitem(last=False)

    def since(self, key: str, after: int) -> bool:
        return self._last.get(key, 0) > after


class RedisCache:
    def __init__(self, conn: StoreLink) -> None:
        self._conn = conn
        self._get_or_claim = conn.script(scripts.GET_OR_CLAIM)
        self._fill = conn.script(scripts.FILL)
        self._fill_indexed = conn.script(scripts.FILL_INDEXED)
        self._extend = conn.script(scripts.EXTEND_LEASE)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.releases = Releases()

    async def get_or_claim(
        self, key: str, holder: str, ttl_seconds: float, *, claim_if_present: bool = False
    ) -> CacheLook:
        seen = self.releases.seen
        value, taken = await self._conn.run(
            lambda: self._get_or_claim(
                keys=flight_keys(key),
                args=[holder, ms(ttl_seconds), "1" if claim_if_present else "0"],
            )
        )
        return CacheLook(value or None, bool(taken), seen)

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

    async def wait(self, key: str, seconds: float, *, after: int) -> None:
        if self.releases.since(key, after):
            return
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
        key = data.decode(errors="replace")
        self.releases.record(key)
        for future in self._waiters.pop(key, []):
            if not future.done():
                future.set_result(None)
