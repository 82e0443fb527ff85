"""The fair, bounded queue: deficit round robin across tenants, cold before refresh, bounds;
and the broker under STS throttling through the real fault proxy in front of moto."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.common import write_tenant_policies
from metaproxy.broker.credentials.fairqueue import FairQueue, RetrySlots
from metaproxy.broker.credentials.scheduler import FairScheduler
from metaproxy.broker.credentials.sts import AsyncSts
from metaproxy.broker.server import BrokerServer
from metaproxy.errors import Overloaded
from metaproxy.models import AssumeRoleSpec
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import Pki, broker_config, issue


def make_spec(number: int) -> AssumeRoleSpec:
    return AssumeRoleSpec("arn:aws:iam::111111111111:role/big-app", f"big.task-{number}", "", 900)


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (entry := queue.pop()) is not None:
        out.append(entry.item)
    return out


def test_tenants_take_turns_so_a_big_tenant_does_not_delay_a_small_one() -> None:
    """9 items of a big tenant queued first do not delay the small tenant's one item."""
    queue: FairQueue[str] = FairQueue(max_depth=100, per_tenant_max=100)
    for i in range(9):
        queue.push(f"big-{i}", tenant="big", priority="cold")
    queue.push("small-0", tenant="small", priority="cold")
    order = drain(queue)
    assert order.index("small-0") == 1
    assert [item for item in order if item.startswith("big")] == [f"big-{i}" for i in range(9)]


def test_cold_starts_go_strictly_before_refreshes() -> None:
    """Every cold start is served before any refresh, whatever the arrival order."""
    queue: FairQueue[str] = FairQueue(max_depth=100, per_tenant_max=100)
    queue.push("r1", tenant="a", priority="refresh")
    queue.push("r2", tenant="b", priority="refresh")
    queue.push("c1", tenant="a", priority="cold")
    queue.push("c2", tenant="c", priority="cold")
    assert drain(queue) == ["c1", "c2", "r1", "r2"]


def test_deficit_round_robin_shares_by_cost() -> None:
    """With costs, each tenant gets about the same total cost per round, not the same count."""
    queue: FairQueue[str] = FairQueue(max_depth=100, per_tenant_max=100, quantum=2.0)
    for i in range(4):
        queue.push(f"heavy-{i}", tenant="heavy", priority="cold", cost=2.0)
        queue.push(f"light-{i}", tenant="light", priority="cold", cost=1.0)
    first_round = drain(queue)[:3]
    assert Counter(item.split("-")[0] for item in first_round) == {"heavy": 1, "light": 2}


def test_per_tenant_overflow_is_refused_at_once_with_retry_after() -> None:
    """A tenant at its bound gets Overloaded with a Retry-After; other tenants still get in."""
    queue: FairQueue[str] = FairQueue(max_depth=100, per_tenant_max=3)
    for i in range(3):
        queue.push(f"a-{i}", tenant="a", priority="cold")
    with pytest.raises(Overloaded) as refused:
        queue.push("a-3", tenant="a", priority="cold")
    assert refused.value.status == 503
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    queue.push("b-0", tenant="b", priority="cold")
    assert (len(queue), queue.tenant_depth("a"), queue.rejected) == (4, 3, 1)


def test_total_overflow_refuses_refreshes_but_a_cold_start_pushes_a_refresh_out() -> None:
    """Full of refreshes: another refresh is refused, a cold start takes the newest refresh's
    place (its task still holds valid credentials)."""
    queue: FairQueue[str] = FairQueue(max_depth=3, per_tenant_max=10)
    for i in range(3):
        queue.push(f"r-{i}", tenant="a", priority="refresh")
    with pytest.raises(Overloaded):
        queue.push("r-3", tenant="b", priority="refresh")
    shed = queue.push("c-0", tenant="b", priority="cold")
    assert shed is not None and shed.item == "r-2"
    assert drain(queue) == ["c-0", "r-0", "r-1"]
    queue.push("c-1", tenant="b", priority="cold")
    queue.push("c-2", tenant="b", priority="cold")
    queue.push("c-3", tenant="b", priority="cold")
    with pytest.raises(Overloaded):
        queue.push("c-4", tenant="c", priority="cold")


def test_retry_slots_spread_a_refused_burst_at_the_drain_rate() -> None:
    """1,000 callers refused in one instant are told to come back spread over the time the
    queue takes to drain them, not all after the same few seconds."""
    slots = RetrySlots(max_seconds=30.0)
    told = [slots.take("big", now=100.0, earliest=2.0, rate=100.0) for _ in range(1000)]
    assert told[0] == pytest.approx(2.0)
    assert told == sorted(told)
    assert told[-1] == pytest.approx(2.0 + 999 / 100.0)
    per_second = Counter(int(seconds) for seconds in told)
    assert max(per_second.values()) <= 100  # never more back in one second than it drains
    # Another scope has its own slots; the first one's are not pushed further by it.
    assert slots.take("small", now=100.0, earliest=1.0, rate=100.0) == pytest.approx(1.0)
    # Once the slots have passed, a refusal starts again from its own estimate.
    assert slots.take("big", now=200.0, earliest=2.0, rate=100.0) == pytest.approx(2.0)


def test_retry_slots_never_promise_beyond_their_limit() -> None:
    slots = RetrySlots(max_seconds=5.0)
    told = [slots.take("t", now=0.0, earliest=1.0, rate=10.0) for _ in range(100)]
    assert max(told) == 5.0 and min(told) == 1.0
    # Slots 1.0, 1.1 … 4.9 (give or take float rounding) were handed out; the rest get the limit.
    assert 40 <= sum(seconds < 5.0 for seconds in told) <= 41


async def test_a_refused_burst_comes_back_spread(sts_url: str) -> None:
    """Through the scheduler: a tenant's overflow gets Retry-Afters spaced out, in order."""
    async with FaultProxy(sts_url) as proxy:
        proxy.set(mode="blackhole")  # nothing drains: the queue stays full
        sts = AsyncSts(endpoint=proxy.url, timeout=30.0)
        scheduler = FairScheduler(
            sts, budget_per_second=50.0, queue_max=100, queue_per_tenant_max=10, workers_max=2
        )
        waiting = [
            asyncio.ensure_future(scheduler.submit(make_spec(i), tenant="big", priority="cold"))
            for i in range(10)
        ]
        await asyncio.sleep(0)
        told = []
        for i in range(10, 110):
            with pytest.raises(Overloaded) as refused:
                await scheduler.submit(make_spec(i), tenant="big", priority="cold")
            assert refused.value.retry_after is not None
            told.append(refused.value.retry_after)
        for task in waiting:
            task.cancel()
        await scheduler.aclose()
        await sts.aclose()
    assert told == sorted(told)
    # Spaced no closer than the queue can drain: never faster than the 50/s budget.
    assert told[-1] - told[0] >= 99 / 50.0


def test_retry_after_grows_with_the_backlog() -> None:
    """Retry-After tells a rejected caller roughly when room will be free again."""
    queue: FairQueue[str] = FairQueue(max_depth=1000, per_tenant_max=1000)
    queue.drain_rate = 100.0
    for i in range(1000):
        queue.push(str(i), tenant=f"t{i % 7}", priority="cold")
    with pytest.raises(Overloaded) as refused:
        queue.push("x", tenant="t0", priority="cold")
    assert refused.value.retry_after == pytest.approx(5.0)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["cold", "refresh"])),
        max_size=60,
    )
)
def test_bounds_hold_and_nothing_is_lost(pushes: list[tuple[str, str]]) -> None:
    """Whatever arrives: depth within both bounds, and every accepted item comes out once."""
    queue: FairQueue[int] = FairQueue(max_depth=20, per_tenant_max=8)
    accepted: set[int] = set()
    for number, (tenant, priority) in enumerate(pushes):
        try:
            shed = queue.push(number, tenant=tenant, priority=priority)  # type: ignore[arg-type]
        except Overloaded:
            continue
        accepted.add(number)
        if shed is not None:
            accepted.discard(shed.item)
        assert len(queue) <= 20
        assert all(queue.tenant_depth(t) <= 8 for t in "abcd")
    out = []
    while (entry := queue.pop()) is not None:
        out.append(entry.item)
    assert sorted(out) == sorted(accepted)


# --- the broker under throttling, through the fault proxy in front of moto -----------------

TENANTS = ("t1", "t2", "t3")


@pytest.fixture
async def throttling_proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url, seed=7) as proxy:
        proxy.set(latency=0.05, throttle_fraction=0.5)
        yield proxy


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_half_throttled_sts_stays_in_budget_and_bounds_and_everything_is_served(
    tmp_path: Path, pki: Pki, throttling_proxy: FaultProxy
) -> None:
    """STS throttles half the calls: the AssumeRole rate stays within the budget, the queue
    within its bound, overflow gets 503 + Retry-After, and every request is served in the end."""
    budget, queue_max = 20.0, 12
    policies = write_tenant_policies(tmp_path / "policies", TENANTS)
    config = broker_config(
        tmp_path, pki, throttling_proxy.url, policies, tls_cert=None, tls_key=None
    )
    sts = AsyncSts(endpoint=throttling_proxy.url, max_connections=16)
    scheduler = FairScheduler(
        sts,
        workers_min=1,
        workers_max=16,
        budget_per_second=budget,
        queue_max=queue_max,
        queue_per_tenant_max=6,
        max_attempts=6,
    )
    server = await BrokerServer.start(config, sts=sts, scheduler=scheduler)  # closes sts
    depths: list[int] = []
    statuses: Counter[int] = Counter()
    retry_afters: list[str] = []

    async def watch_depth() -> None:
        while True:
            depths.append(scheduler.stats().queue_depth)
            await asyncio.sleep(0.02)

    async def cold_start(session: aiohttp.ClientSession, tenant: str, task: str) -> None:
        headers = {"Authorization": f"Bearer {issue(pki, task, tenant)}"}
        for _ in range(60):
            async with session.post(
                server.url + "/v1/credentials", json={}, headers=headers
            ) as response:
                statuses[response.status] += 1
                if response.status == 200:
                    return
                assert response.status == 503, await response.text()
                retry_afters.append(response.headers.get("Retry-After", ""))
                await asyncio.sleep(float(response.headers["Retry-After"]))
        raise AssertionError(f"{tenant}/{task} never served")

    watcher = asyncio.create_task(watch_depth())
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        cold_start(session, tenant, f"task-{i}")
                        for tenant in TENANTS
                        for i in range(16)
                    )
                ),
                timeout=25,
            )
    finally:
        watcher.cancel()
        await server.aclose()
        await scheduler.aclose()
    proxy_stats = throttling_proxy.stats()
    assert statuses[200] == len(TENANTS) * 16
    assert statuses[503] > 0 and all(value.isdigit() for value in retry_afters)
    assert max(depths) <= queue_max
    assert int(str(proxy_stats["assume_role_throttled"])) > 0
    assert throttling_proxy.max_rate(1.0) <= budget
    assert scheduler.stats().sts.throttles == int(str(proxy_stats["assume_role_throttled"]))
