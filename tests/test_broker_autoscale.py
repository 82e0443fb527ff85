"""Worker autoscaling (the pure sizing policy, and the pool under a burst), the STS call
budget, and the circuit breaker's states, on virtual time (`metaproxy.testing.clocks`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from metaproxy.broker.credentials.autoscale import (
    Load,
    RateMeter,
    ScaleLimits,
    decide,
    wanted_workers,
)
from metaproxy.broker.credentials.budget import CallWindow, budget_limiter
from metaproxy.broker.credentials.circuit import CircuitBreaker
from metaproxy.broker.credentials.scheduler import FairScheduler
from metaproxy.broker.credentials.sts import AssumedRole, OnSent
from metaproxy.clock import LoopClock
from metaproxy.models import AssumeRoleSpec, Credentials
from metaproxy.testing.clocks import ManualClock
from metaproxy.testing.recording import max_calls_in_window

LIMITS = ScaleLimits(workers_min=2, workers_max=64, budget_per_second=500.0)


# The async tests wait on the event loop's clock only (the pool, the budget, the call window):
# on virtual time their seconds pass in no real time.
pytestmark = pytest.mark.virtual_time


def state_of(breaker: CircuitBreaker) -> str:
    """The state as a plain string (mypy would narrow the property across calls)."""
    return breaker.state


def test_workers_follow_littles_law() -> None:
    """100 arrivals/s at 100 ms per item need about 10 busy workers (with some headroom)."""
    assert wanted_workers(Load(0, 100.0, 0.1), LIMITS) == 13


def test_workers_never_exceed_what_the_budget_can_use() -> None:
    """A huge backlog wants no more workers than budget x latency (plus headroom)."""
    small_budget = ScaleLimits(workers_min=2, workers_max=640, budget_per_second=50.0)
    assert wanted_workers(Load(100_000, 5_000.0, 0.2), small_budget) == 13


def test_workers_stay_within_floor_and_ceiling() -> None:
    """Idle: the floor; overwhelming load: the ceiling."""
    assert wanted_workers(Load(0, 0.0, 0.1), LIMITS) == 2
    assert wanted_workers(Load(50_000, 10_000.0, 2.0), LIMITS) == 64


def test_scale_up_is_immediate() -> None:
    """A burst lifts the pool on the very next decision."""
    decision = decide(2, Load(1000, 400.0, 0.1), LIMITS, now=0.0, low_since=None)
    assert decision.workers > 40


def test_scale_down_waits_then_goes_in_steps() -> None:
    """Low load must last `scale_down_after` seconds; then the pool shrinks a step at a time."""
    idle = Load(0, 0.0, 0.1)
    first = decide(40, idle, LIMITS, now=0.0, low_since=None)
    assert (first.workers, first.low_since) == (40, 0.0)
    assert decide(40, idle, LIMITS, now=29.0, low_since=0.0).workers == 40
    step = decide(40, idle, LIMITS, now=31.0, low_since=0.0)
    assert step.workers == 30
    assert decide(3, idle, LIMITS, now=62.0, low_since=0.0).workers == 2


def test_a_load_spike_resets_the_scale_down_timer() -> None:
    """If the wanted size climbs back to the current one, the low-load clock starts over."""
    assert decide(20, Load(500, 200.0, 0.1), LIMITS, now=10.0, low_since=0.0).low_since is None


def test_circuit_opens_after_consecutive_failures_and_probes_after_cool_down() -> None:
    """closed → open after N failures (calls refused) → one half-open probe → closed on success."""
    clock = ManualClock()
    breaker = CircuitBreaker(clock, failure_threshold=3, cool_down=5.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow() and breaker.rejects_now()
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(5.0)
    assert state_of(breaker) == "half_open" and not breaker.rejects_now()
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record_success()
    assert state_of(breaker) == "closed" and breaker.allow()


def test_a_failed_probe_opens_the_circuit_again() -> None:
    """The half-open probe failing starts a new cool-down."""
    clock = ManualClock()
    breaker = CircuitBreaker(clock, failure_threshold=1, cool_down=2.0)
    breaker.record_failure()
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and breaker.opened == 2


def test_throttling_does_not_open_the_circuit() -> None:
    """A throttled answer means STS is up: it neither counts as a failure nor holds a probe."""
    breaker = CircuitBreaker(ManualClock(), failure_threshold=1)
    for _ in range(10):
        assert breaker.allow()
        breaker.record_neutral()
    assert breaker.state == "closed"


async def test_budget_limiter_never_lets_a_full_window_exceed_the_budget() -> None:
    """Even from a full bucket (STS back after an outage), no 1 s window exceeds the budget."""
    limiter = budget_limiter(40.0)
    loop = asyncio.get_running_loop()
    times: list[float] = []
    deadline = loop.time() + 2.5
    while loop.time() < deadline:
        await limiter.acquire()
        times.append(loop.time())
    assert max_calls_in_window(times, 1.0) <= 40
    assert len(times) >= 80  # and it does not starve either


class LatencySts:
    """STS in the test's event loop: every call takes `latency` seconds, and is counted when it
    goes out, as the fault proxy counts it."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.sent: list[float] = []

    async def assume_role(
        self,
        spec: AssumeRoleSpec,
        *,
        signed_with: Credentials | None = None,
        on_sent: OnSent | None = None,
    ) -> AssumedRole:
        loop = asyncio.get_running_loop()
        if on_sent is not None:
            on_sent()
        self.sent.append(loop.time())
        key = f"ASIA{len(self.sent):016d}"
        await asyncio.sleep(self.latency)
        expiry = datetime.now(UTC) + timedelta(seconds=spec.duration_seconds)
        return AssumedRole(Credentials(key, "secret", "token", expiry), f"{spec.role_arn}/s")

    async def aclose(self) -> None:
        return None


async def test_pool_grows_under_a_burst_within_the_budget_then_shrinks() -> None:
    """A burst of 120 cold starts at 200 ms STS latency: the pool grows from its floor to what
    the budget can use, every call stays within budget, and the pool later shrinks again."""
    budget = 40.0
    sts = LatencySts(0.2)
    scheduler = FairScheduler(
        sts,
        clock=LoopClock(),
        workers_min=1,
        workers_max=32,
        budget_per_second=budget,
        queue_max=1000,
        queue_per_tenant_max=1000,
        scale_down_after=0.5,
    )
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, scheduler.stats().workers)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        specs = [
            AssumeRoleSpec("arn:aws:iam::111111111111:role/app", f"burst.{i}", "", 900)
            for i in range(120)
        ]
        roles = await asyncio.wait_for(
            asyncio.gather(*(scheduler.submit(s, tenant="t", priority="cold") for s in specs)),
            timeout=20,
        )
        assert len({role.credentials.access_key_id for role in roles}) == 120
        assert peak >= 8  # 40/s x ~0.2 s: the floor of 1 could never have kept up
        assert peak <= 32
        for _ in range(100):
            if scheduler.stats().workers <= 2:
                break
            await asyncio.sleep(0.1)
        assert scheduler.stats().workers <= 2
    finally:
        watcher.cancel()
        await scheduler.aclose()
    assert len(sts.sent) == 120
    assert max_calls_in_window(sts.sent, 1.0) <= budget


async def test_call_window_holds_calls_past_its_limit_until_the_oldest_leaves() -> None:
    """However callers arrive, no trailing second ever holds more than the window's limit."""
    window = CallWindow(limit=20, window=0.5)
    loop = asyncio.get_running_loop()
    admitted: list[float] = []

    async def caller() -> None:
        slot = await window.admit()
        slot.sent()
        admitted.append(loop.time())

    started = loop.time()
    await asyncio.gather(*(caller() for _ in range(50)))  # all at once: 2.5 windows' worth
    assert max_calls_in_window(admitted, 0.5) <= 20
    assert window.waits > 0
    assert loop.time() - started >= 1.0  # the last 10 had to wait for two windows to pass
    assert CallWindow.for_budget(500.0).limit == 470


async def test_call_window_counts_a_call_from_when_it_leaves_not_when_it_was_admitted() -> None:
    """A call admitted now but on the wire only later counts from when it left, so a long
    event-loop turn between the two cannot bunch calls; one that never left frees its place."""
    window = CallWindow(limit=2, window=0.5)
    loop = asyncio.get_running_loop()
    first, second = await window.admit(), await window.admit()
    third = asyncio.create_task(window.admit())
    await asyncio.sleep(0.05)
    assert not third.done()  # both pending count, though neither has left yet
    second.release()  # it never left: its place is free
    third_slot = await asyncio.wait_for(third, 1.0)
    await asyncio.sleep(0.3)  # a long turn: admitted 0.3 s ago, leaving now
    left_at = loop.time()
    first.sent()
    third_slot.sent()
    third_slot.release()  # after sending, releasing changes nothing
    (await window.admit()).sent()
    assert loop.time() - left_at >= 0.49  # counted from leaving, not from admission


def test_a_waiting_backlog_gets_a_worker_each_up_to_what_the_budget_can_use() -> None:
    """A cold start on an idle broker: the rate still reads low (49/s of a real 200/s), but
    the 80 waiting tasks and the 7 busy workers get a worker each at once, capped by what a
    500/s budget can keep busy at 125 ms a call (79) and by the ceiling."""
    load = Load(depth=80, arrival_rate=49.0, item_seconds=0.125, busy=7)
    assert wanted_workers(load, LIMITS) == 64  # the ceiling of LIMITS
    roomy = ScaleLimits(workers_min=2, workers_max=256, budget_per_second=500.0)
    assert wanted_workers(load, roomy) == 79
    assert wanted_workers(Load(depth=5, arrival_rate=0.0, item_seconds=0.1, busy=2), roomy) == 7


def test_the_arrival_rate_is_seen_at_once_and_forgotten_slowly() -> None:
    """200/s from nothing reads 200/s on the first tick after it starts (the events before the
    first tick count from the first of them); a pause decays over the time constant."""
    meter = RateMeter(time_constant=2.0)
    for step in range(50):
        meter.count(now=10.0 + step * 0.005)
    assert meter.rate(10.25) == pytest.approx(200.0)
    assert 70.0 < meter.rate(12.25) < 80.0  # 2 s of nothing: e^-1 of it left
