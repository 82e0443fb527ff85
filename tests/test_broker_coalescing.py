"""Concurrent identical requests share one STS call; cached credentials are refreshed ahead."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from bench.common import write_tenant_policies
from metaproxy.broker.credentials.local import LocalCache
from metaproxy.broker.credentials.scheduler import FairScheduler
from metaproxy.broker.credentials.source import Fetch, Fetched, Scope
from metaproxy.broker.credentials.sts import AssumedRole, AsyncSts
from metaproxy.broker.server import BrokerServer
from metaproxy.errors import Overloaded
from metaproxy.models import AssumeRoleSpec, Credentials
from metaproxy.testing.clocks import ManualClock
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import Pki, broker_config, issue


@pytest.fixture
async def slow_proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as proxy:
        # Slow enough that all 200 requests arrive while the one AssumeRole is in flight.
        proxy.set(latency=1.5)
        yield proxy


async def test_200_concurrent_identical_cold_requests_make_one_assume_role(
    tmp_path: Path, pki: Pki, slow_proxy: FaultProxy
) -> None:
    """200 POSTs with the same identity token, at once: 200 answers, 1 AssumeRole at STS."""
    policies = write_tenant_policies(tmp_path / "policies", ["t1"])
    config = broker_config(tmp_path, pki, slow_proxy.url, policies)
    sts = AsyncSts(endpoint=slow_proxy.url)
    scheduler = FairScheduler.from_config(config, sts)
    server = await BrokerServer.start(config, sts=sts, scheduler=scheduler)  # closes sts
    token = issue(pki, "task-1", "t1")
    tls = ssl.create_default_context(cafile=str(pki.ca))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls, limit=0)) as s:

            async def ask() -> tuple[int, str]:
                async with s.post(
                    server.url + "/v1/credentials",
                    json={},
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    body = await response.json()
                    return response.status, body["credentials"]["access_key_id"]

            answers = await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(200))), 25)
    finally:
        await server.aclose()
        await scheduler.aclose()
    assert {status for status, _ in answers} == {200}
    assert len({key for _, key in answers}) == 1
    assert slow_proxy.stats()["assume_role_calls"] == 1
    assert scheduler.stats().sts.calls == 1


class FunctionSts:
    """The bottom of a credential stack for unit tests: each fetch is `assume()`."""

    def __init__(self, clock: ManualClock, assume: Callable[[], Awaitable[AssumedRole]]) -> None:
        self._clock = clock
        self._assume = assume

    def claim(self, fetch: Fetch) -> None:
        return None

    def release(self, fetch: Fetch) -> None:
        return None

    def drop(self, scope: Scope) -> int:
        return 0

    async def get(self, fetch: Fetch) -> Fetched:
        return Fetched(await self._assume(), "sts", self._clock.now())


def fetch_of(*key: object) -> Fetch:
    """A request whose cache key is made of `key` (as the session name)."""
    spec = AssumeRoleSpec("arn:aws:iam::111111111111:role/app", repr(key), "acme", 3600)
    return Fetch(spec, "acme", "task")


async def test_cached_answers_keep_at_least_half_their_life_while_sts_is_healthy() -> None:
    """1-hour credentials, asked for every minute for 3 hours: every answer has >= 30 minutes
    left, nobody waits for STS on a warm key, and STS is called about once per half-life."""
    clock = ManualClock()
    fetches = 0

    async def fetch() -> AssumedRole:
        # The STS seam: credentials for one hour from the (test's) now.
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0)
        expiry = clock.now() + timedelta(hours=1)
        creds = Credentials(f"ASIA{fetches:012d}", "secret", "token", expiry)
        return AssumedRole(creds, "arn:aws:sts::111111111111:assumed-role/app/task")

    cache = LocalCache(FunctionSts(clock, fetch), clock, refresh_fraction=0.5)
    sources = []
    for _ in range(180):
        result = await cache.get(fetch_of("key"))
        sources.append(result.origin)
        assert result.role.credentials.seconds_left(clock.now()) >= 30 * 60
        await asyncio.sleep(0)  # let a background refresh finish, as STS would within seconds
        clock.moment += timedelta(minutes=1)
    assert sources[0] == "sts" and set(sources[1:]) == {"cache"}
    assert 6 <= fetches <= 8  # ~ every 27 minutes over 3 hours


async def test_a_failing_background_refresh_keeps_serving_the_cached_set() -> None:
    """STS failing at refresh time: callers keep getting the still-valid cached credentials."""
    clock = ManualClock()
    healthy = True

    async def fetch() -> AssumedRole:
        if not healthy:
            from metaproxy.errors import StsUnavailable

            raise StsUnavailable("down")
        expiry = clock.now() + timedelta(hours=1)
        return AssumedRole(Credentials("ASIAONE", "s", "t", expiry), "arn")

    cache = LocalCache(FunctionSts(clock, fetch), clock, refresh_fraction=0.5)
    await cache.get(fetch_of("k"))
    healthy = False
    for minutes in (28, 31, 40, 50):
        clock.moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
        result = await cache.get(fetch_of("k"))
        await asyncio.sleep(0)
        assert result.role.credentials.access_key_id == "ASIAONE"
        assert result.origin in ("cache", "stale")


async def test_a_refused_fetch_leaves_no_reference_cycle_behind() -> None:
    """A burst's 503s go through here by the thousand: each must be freed by reference
    counting. A cycle (this frame -> the task -> its exception -> the traceback) left ~45
    objects per refusal for the garbage collector, whose pauses stalled the STS workers."""

    async def refused() -> AssumedRole:
        raise Overloaded("tenant queue full")

    clock = ManualClock()
    cache = LocalCache(FunctionSts(clock, refused), clock, refresh_fraction=0.5)

    gc.collect()
    gc.disable()
    try:
        for number in range(50):
            with pytest.raises(Overloaded):
                await cache.get(fetch_of("key", number))
        await asyncio.sleep(0)  # the tasks' done callbacks
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable < 50  # 50 refusals; with the cycle, 700 objects were left
