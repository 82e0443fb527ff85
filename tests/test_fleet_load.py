"""The fleet under load, as processes: three `metaproxy broker` replicas on a real Valkey/Redis,
the local STS behind the fault proxy, and a load generator of its own that behaves like
sidecars behind a Service (Retry-After on 429/503, the next replica on a connection error).

The STS rate is counted where AWS would count it: at the fault proxy, which runs in this
test's event loop (the load generator is another process, so it does not skew the counting).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.fleet_harness import (
    FleetFiles,
    best_window_rate,
    make_fleet_files,
    offer,
    run_burst,
    start_replicas,
    stop_replicas,
    sustained_rate,
)
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.recording import max_calls_in_window
from metaproxy.testing.redis_server import RedisServer

# Load tests (`make load-test`): each drives three replicas at the STS budget, or a tenant at
# seven times its rate, for seconds, and judges rates where the calls arrive. They run alone, one
# after another: beside other tests a starved replica's calls land late, bunched with the next
# second's (321 in one second was seen beside the parallel pass).
pytestmark = pytest.mark.load

BUDGET = 300.0
# The bound: 2% over the budget at most, in any one second at the proxy.
MAX_ONE_SECOND_CALLS = 306
STS_LATENCY = 0.05
TENANTS = ("t1", "t2", "t3")
FLEET_BURST = 1200  # tasks: four seconds of the budget
ALONE_BURST = 1500  # five seconds: a ramp, three full ones, and the drain
KILL_BURST = 900


@pytest.fixture(scope="module")
def fast_sts() -> Iterator[str]:
    """moto's STS alone (about twice the AssumeRole rate of the whole moto server): the burst
    must find STS faster than the budget, or the budget is not what is measured."""
    from metaproxy.testing.emulator import StsEmulator

    emulator = StsEmulator(sts_only=True)
    yield emulator.start()
    emulator.stop()


def spread(files: FleetFiles, count: int, prefix: str, replicas: int) -> list[tuple[int, str]]:
    """`count` distinct tasks over the tenants, round robin over `replicas` replicas."""
    return [
        (n % replicas, files.token(TENANTS[n % len(TENANTS)], f"{prefix}-{n}"))
        for n in range(count)
    ]


async def test_three_replicas_share_one_sts_budget_that_one_replica_alone_can_fill(
    tmp_path: Path, redis_server: RedisServer, fast_sts: str
) -> None:
    """A 1,200-task cold burst over three replicas never tops 306 AssumeRole/s at the proxy;
    one replica alone, the others idle, sustains at least 90% of the 300/s budget."""
    files = make_fleet_files(tmp_path / "fleet", TENANTS)
    # Four seconds of queued work for the fleet and five for one replica: the cap is judged
    # on every one-second window and the rate on the best three, so more seconds only repeat
    # the same windows (3,000 and 2,000 tasks took 23 s of the serial pass).
    fleet_burst = spread(files, FLEET_BURST, "fleet", 3)
    alone_burst = [(0, token) for _, token in spread(files, ALONE_BURST, "alone", 1)]
    async with FaultProxy(fast_sts) as proxy:
        proxy.set(latency=STS_LATENCY)
        replicas = await start_replicas(
            files, 3, sts_endpoint=proxy.url, store=redis_server.url, budget=BUDGET
        )
        try:
            urls = [r.url for r in replicas]
            fleet = await run_burst(tmp_path, "fleet", urls, fleet_burst)
            fleet_calls = proxy.assume_role_timeline()
            proxy.reset_counters()
            alone = await run_burst(tmp_path, "alone", urls, alone_burst)
            alone_calls = proxy.assume_role_timeline()
        finally:
            await stop_replicas(replicas)

    # What one replica reaches with the whole budget to itself: its best 3 seconds of calls
    # while the burst is queued (the ramp and the drain's tail left out). The sustained rate
    # over the whole burst is printed too; on a loaded 2-core machine it dips where the
    # replica's event loop wakes later than the budget's burst tolerance (store/redis_budget).
    alone_rate = best_window_rate(alone_calls, window=3.0)
    print(
        f"fleet: max {max_calls_in_window(fleet_calls)}/s, sustained "
        f"{sustained_rate(fleet_calls):.0f}/s, last credentials at {fleet.last:.1f}s, "
        f"{fleet.statuses}; alone: max {max_calls_in_window(alone_calls)}/s, best 3 s "
        f"{alone_rate:.0f}/s, sustained {sustained_rate(alone_calls):.0f}/s, "
        f"last at {alone.last:.1f}s, {alone.statuses}"
    )
    assert (fleet.failed, alone.failed) == (0, 0)
    assert len(fleet_calls) == FLEET_BURST  # one AssumeRole per task, none repeated
    assert max_calls_in_window(fleet_calls) <= MAX_ONE_SECOND_CALLS
    assert max_calls_in_window(alone_calls) <= MAX_ONE_SECOND_CALLS
    assert alone_rate >= 0.9 * BUDGET


FLOOD_LIMITS = {
    "requests_per_second": 20,
    "burst": 5,
    "max_in_flight": 100,
    # The tenant's rate is what is under test, not the identity's.
    "per_identity_rps": 1000,
    "per_identity_burst": 1000,
}
FLOOD_RATE = 150.0  # offered, requests/s: 7.5 times the tenant's rate
FLOOD_SECONDS = 6.0


async def test_a_tenant_flooding_three_replicas_gets_the_rate_it_gets_from_one(
    tmp_path: Path, redis_server: RedisServer, fast_sts: str
) -> None:
    """A tenant at 20/s flooding three replicas is accepted at its rate from one (±10%);
    another tenant asking the same replicas meanwhile gets every request answered."""
    files = make_fleet_files(tmp_path / "fleet", ["flood", "calm"], limited={"flood": FLOOD_LIMITS})
    flood = [files.token("flood", f"loop-{n}") for n in range(10)]
    calm = [files.token("calm", f"web-{n}") for n in range(10)]
    replicas = await start_replicas(
        files, 3, sts_endpoint=fast_sts, store=redis_server.url, budget=BUDGET
    )
    try:
        urls = [r.url for r in replicas]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000)) as session:
            on_one = await offer(session, urls[:1], flood, rate=FLOOD_RATE, seconds=FLOOD_SECONDS)
            await asyncio.sleep(1.0)  # the tenant's burst comes back
            on_three, others = await asyncio.gather(
                offer(session, urls, flood, rate=FLOOD_RATE, seconds=FLOOD_SECONDS),
                offer(session, urls, calm, rate=15.0, seconds=FLOOD_SECONDS),
            )
    finally:
        await stop_replicas(replicas)

    one_rate = on_one.count(200) / FLOOD_SECONDS
    three_rate = on_three.count(200) / FLOOD_SECONDS
    print(
        f"accepted from one replica {one_rate:.1f}/s, from three {three_rate:.1f}/s; "
        f"flood {on_three.statuses()}, other tenant {others.statuses()}"
    )
    assert set(on_one.statuses()) == set(on_three.statuses()) == {200, 429}
    assert abs(three_rate - one_rate) <= 0.1 * one_rate
    # And that rate is the tenant's 20/s (its burst of 5 on top), not 20/s per replica.
    assert one_rate <= 1.1 * (20 + 5 / FLOOD_SECONDS)
    assert others.statuses() == {200: int(15.0 * FLOOD_SECONDS)}


async def test_a_replica_killed_mid_burst_leaves_no_task_without_credentials(
    tmp_path: Path, redis_server: RedisServer, fast_sts: str
) -> None:
    """kill -9 of one of three replicas mid-burst: its clients fail over and every task gets
    credentials; the fleet's STS rate at the proxy stays within the budget."""
    files = make_fleet_files(tmp_path / "fleet", TENANTS)
    # 900 tasks: three seconds at the budget, the kill lands after the first 300 calls; with
    # 1,500 the two seconds after the failover only repeated it (at 13 s of CPU a run).
    burst = spread(files, KILL_BURST, "kill", 3)
    async with FaultProxy(fast_sts) as proxy:
        proxy.set(latency=STS_LATENCY)
        replicas = await start_replicas(
            files, 3, sts_endpoint=proxy.url, store=redis_server.url, budget=BUDGET
        )
        try:
            running = asyncio.create_task(
                run_burst(tmp_path, "kill", [r.url for r in replicas], burst)
            )
            # About a second into the burst: the victim holds queued requests, in-flight STS
            # calls and single-flight leases.
            while len(proxy.assume_role_timeline()) < 300 and not running.done():
                await asyncio.sleep(0.01)
            replicas[1].kill()
            outcome = await running
            calls = proxy.assume_role_timeline()
        finally:
            await stop_replicas(replicas)

    print(
        f"killed replica-2 after 300 calls: {outcome.failovers} failovers, "
        f"errors {outcome.errors}, max {max_calls_in_window(calls)}/s, {len(calls)} calls, "
        f"last credentials at {outcome.last:.1f}s"
    )
    assert outcome.failed == 0
    assert outcome.statuses.get(200) == KILL_BURST
    assert outcome.failovers > 0  # the kill did land mid-burst
    assert max_calls_in_window(calls) <= MAX_ONE_SECOND_CALLS
