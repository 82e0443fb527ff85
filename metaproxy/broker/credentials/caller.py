"""One AssumeRole, done right: inside the STS budget, retried with backoff, routed by region.

`StsCaller` is the bottom of the scheduler: a worker hands it a spec once the fair queue has
picked it. Each attempt waits for the budget (the fleet's, when the store is shared), goes to
the first region whose circuit lets it through (`regions.py`), is timed out, and is counted.
A budget slot a request's admission brought along (`Ticket.budget_due`) is spent first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from metaproxy.broker.credentials.autoscale import Ewma
from metaproxy.broker.credentials.budget import LATE_SLOT_SECONDS, CallWindow
from metaproxy.broker.credentials.circuit import CircuitBreaker, CircuitState
from metaproxy.broker.credentials.regions import RegionRoutes, RegionStats, Route
from metaproxy.broker.credentials.sts import AssumedRole, StsClient, StsThrottled
from metaproxy.broker.store.base import BudgetStats, StsBudget
from metaproxy.broker.store.memory import LocalBudget
from metaproxy.clock import WaitingClock
from metaproxy.errors import MetaproxyError, StsUnavailable, UpstreamError
from metaproxy.models import AssumeRoleSpec, Credentials

log = logging.getLogger("metaproxy.broker.scheduler")


def full_jitter_backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """AWS's "full jitter": uniform over [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto


@dataclass(frozen=True, slots=True)
class CallerStats:
    """What the STS calls came to, with the budget and every region's circuit."""

    calls: int  # attempts
    ok: int
    throttles: int
    errors: int  # STS unreachable or failing (timeouts included)
    timeouts: int
    refused: int  # 4xx from STS: it answered no (e.g. the role does not trust us)
    fast_failures: int  # failed by an open circuit without calling STS
    latency_seconds: float  # moving average of one attempt
    circuit: CircuitState  # the best region's: open only when every region is
    circuit_opened: int  # times any region's circuit opened
    budget_per_second: float
    window_waits: int  # calls the call window held back
    given_slots: int  # budget slots an admission brought along, spent
    late_slots: int  # ... and let go, late
    budget: BudgetStats
    regions: tuple[RegionStats, ...]

    @property
    def circuit_open(self) -> bool:
        return self.circuit == "open"

    def region(self, name: str) -> RegionStats:
        return next(region for region in self.regions if region.region == name)


class StsCaller:
    """One AssumeRole, with retries: each attempt inside the budget, timed out, and counted.

    `sts` may be a `RegionalSts`: each attempt then goes to the first region whose circuit lets
    it through (`regions.py`); `breaker` makes one circuit per region."""

    def __init__(
        self,
        sts: StsClient,
        *,
        budget_per_second: float,
        breaker: Callable[[], CircuitBreaker],
        clock: WaitingClock,
        max_attempts: int = 4,
        call_timeout: float = 10.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        budget: StsBudget | None = None,
    ) -> None:
        self.routes = RegionRoutes(sts, breaker)
        self.budget_per_second = budget_per_second
        # Paces calls within the budget (the fleet's, when the store is shared); the call
        # window below is this process's hard cap at the moment of sending.
        self._budget: StsBudget = budget or LocalBudget(budget_per_second)
        self._window = CallWindow.for_budget(budget_per_second)
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._call_timeout = call_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self.latency = Ewma(initial=0.2, time_constant=5.0)
        self.calls = 0
        self.ok = 0
        self.throttles = 0
        self.errors = 0
        self.timeouts = 0
        self.refused = 0  # 4xx from STS: UpstreamError, not retried
        self.fast_failures = 0  # failed by the open circuit without calling STS
        # Slots a cold request's admission took along (ADMIT_AND_CLAIM), by when they were due.
        self._given: deque[float] = deque()
        self.given_slots = 0
        self.late_slots = 0

    def circuit_retry_after(self) -> float:
        return max(1.0, self.routes.retry_after())

    def give_slot(self, due: float) -> None:
        """A budget slot taken for this replica along with a request's admission (due at
        event-loop time `due`): the next call uses it rather than asking the budget, unless it
        has gone late by then."""
        self._given.append(due)

    async def take_budget(self) -> None:
        """Wait for one call's worth of the budget (for a caller that picks its work after)."""
        now = asyncio.get_running_loop().time()
        while self._given:
            if now - self._given.popleft() <= LATE_SLOT_SECONDS:
                self.given_slots += 1
                return
            self.late_slots += 1
        await self._budget.acquire()

    async def assume_role(self, spec: AssumeRoleSpec, *, budget_taken: bool = False) -> AssumedRole:
        """`budget_taken`: the caller already holds the token for the first attempt."""
        if spec.via is None:
            return await self._call(spec, budget_taken=budget_taken)
        # Role chaining: two calls, each within the budget and retried on its own; the second
        # is signed with the first's credentials (a retry of the second reuses them).
        first = await self._call(spec.via, budget_taken=budget_taken)
        final = await self._call(spec, signed_with=first.credentials)
        return dataclasses.replace(
            final,
            via_assumed_role_arn=first.assumed_role_arn,
            via_access_key_id=first.credentials.access_key_id,
        )

    async def _call(
        self,
        spec: AssumeRoleSpec,
        *,
        budget_taken: bool = False,
        signed_with: Credentials | None = None,
    ) -> AssumedRole:
        error: MetaproxyError = StsUnavailable("AssumeRole not attempted")
        failed_region: str | None = None
        for attempt in range(self._max_attempts):
            route = self.routes.pick(avoid=failed_region)
            if route is None:
                self.fast_failures += 1
                raise StsUnavailable(
                    "STS circuit open; not calling", retry_after=self.circuit_retry_after()
                )
            if attempt or not budget_taken:
                await self.take_budget()
            outcome = await self._attempt(route, spec, signed_with)
            if isinstance(outcome, AssumedRole):
                return outcome
            error = outcome
            if isinstance(error, UpstreamError) or attempt + 1 == self._max_attempts:
                break
            # A region that did not answer: the retry goes to another one, if any will take it.
            is_down = isinstance(error, StsUnavailable) and not isinstance(error, StsThrottled)
            failed_region = route.region if is_down else None
            await self._clock.sleep(
                full_jitter_backoff(attempt, base=self._backoff_base, cap=self._backoff_cap)
            )
        raise error

    async def _attempt(
        self, route: Route, spec: AssumeRoleSpec, signed_with: Credentials | None
    ) -> AssumedRole | MetaproxyError:
        """Make one call and return its outcome as a value (errors included)."""
        self.calls += 1
        started = self._clock.monotonic()
        outcome: AssumedRole | MetaproxyError
        slot = await self._window.admit()
        try:
            # Inline, not wait_for: wait_for would start the call as a new task, one event-loop
            # turn later, and a turn can be long on a busy broker.
            async with asyncio.timeout(self._call_timeout):
                outcome = await route.client.assume_role(
                    spec, signed_with=signed_with, on_sent=slot.sent
                )
        except TimeoutError:
            self.timeouts += 1
            outcome = StsUnavailable(
                f"AssumeRole {spec.role_arn}: no answer in {self._call_timeout}s"
            )
        except MetaproxyError as exc:
            outcome = exc
        except asyncio.CancelledError:
            route.breaker.record_neutral()  # free a half-open probe slot
            raise
        except Exception:
            # Never pass unknown error text on: log it here, give the caller our own error.
            log.exception("unexpected error from the STS client")
            outcome = StsUnavailable(f"AssumeRole {spec.role_arn}: unexpected client error")
        finally:
            slot.release()  # a call that never left stops counting; one that left stays
        self._record(route, outcome, self._clock.monotonic() - started)
        return outcome

    def _record(self, route: Route, outcome: AssumedRole | MetaproxyError, seconds: float) -> None:
        breaker = route.breaker
        if isinstance(outcome, AssumedRole):
            self.ok += 1
            route.ok += 1
            breaker.record_success()
            self.latency.update(seconds, self._clock.monotonic())
            return
        if isinstance(outcome, StsThrottled):
            self.throttles += 1
            route.throttled += 1
            breaker.record_neutral()  # STS answered; it is busy, not down
            return
        route.error += 1
        if isinstance(outcome, StsUnavailable):
            self.errors += 1
            breaker.record_failure()
        elif isinstance(outcome, UpstreamError):
            self.refused += 1
            breaker.record_success()  # STS answered: it is up
        else:
            self.errors += 1
            breaker.record_neutral()

    def stats(self) -> CallerStats:
        return CallerStats(
            calls=self.calls,
            ok=self.ok,
            throttles=self.throttles,
            errors=self.errors,
            timeouts=self.timeouts,
            refused=self.refused,
            fast_failures=self.fast_failures,
            latency_seconds=self.latency.value,
            circuit=self.routes.state,
            circuit_opened=self.routes.opened,
            budget_per_second=self.budget_per_second,
            window_waits=self._window.waits,
            given_slots=self.given_slots,
            late_slots=self.late_slots,
            budget=self._budget.stats(),
            regions=self.routes.stats(),
        )
