"""A bounded, fair queue of STS work: deficit round robin across tenants, cold starts first.

Why each rule exists (a credentials provider once fell behind a growing fleet; its single FIFO
queue reached tens of thousands and every new deployment failed):
- Depth is bounded, in total and per tenant; overflow is refused at once with `QueueFull`
  (503 + Retry-After) instead of queueing work that will time out anyway. `RetrySlots` spreads
  the Retry-Afters, so that thousands of callers refused together do not come back together.
- Tenants take turns (deficit round robin), so a tenant that deploys 9,000 tasks at once does
  not delay another tenant's ten.
- Cold starts (a task with no valid credentials: it cannot start) go strictly before refreshes
  (a task that still holds valid credentials). When the queue is full, a cold start may push
  out a waiting refresh, whose task keeps serving what it has.

Pure data structure: no I/O, no clock, no event loop; the scheduler wraps it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from metaproxy.errors import Overloaded

Priority = Literal["cold", "refresh"]
PRIORITIES: tuple[Priority, ...] = ("cold", "refresh")
T = TypeVar("T")

MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 30.0  # a guess further ahead than this is not worth trusting
TOTAL = "*"  # the scope of a refusal because the whole queue is full


class QueueFull(Overloaded):
    """Refused: `scope` (a tenant, or TOTAL) has `waiting` items queued, its bound."""

    def __init__(self, detail: str, *, scope: str, waiting: int, retry_after: float) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.scope = scope
        self.waiting = waiting
        self.earliest = retry_after  # the queue's own estimate, before RetrySlots spreads it


class RetrySlots:
    """Retry-Afters that bring refused callers back spread out at the rate the queue drains.

    A burst refused in one instant and told "come back in 5 s" comes back in one instant 5 s
    later, is mostly refused again, and costs the broker a full request each time. Here each
    refusal in a scope takes the next free slot instead: no sooner than the queue's estimate,
    and 1/rate after the slot handed out before it. Pure: the caller passes the time.
    """

    def __init__(self, *, max_seconds: float = MAX_RETRY_AFTER, max_scopes: int = 10_000) -> None:
        self._next: dict[str, float] = {}
        self._max_seconds = max_seconds
        self._max_scopes = max_scopes

    def take(self, scope: str, *, now: float, earliest: float, rate: float) -> float:
        """Seconds until this caller's slot, within [MIN_RETRY_AFTER, max_seconds]."""
        slot = max(now + earliest, self._next.get(scope, now))
        if slot - now >= self._max_seconds:
            return self._max_seconds  # beyond what is worth promising; the slot is not taken
        if len(self._next) >= self._max_scopes and scope not in self._next:
            self._forget_past(now)
        self._next[scope] = slot + 1.0 / max(rate, 1e-3)
        return max(MIN_RETRY_AFTER, slot - now)

    def _forget_past(self, now: float) -> None:
        for scope in [scope for scope, slot in self._next.items() if slot <= now]:
            del self._next[scope]


@dataclass(slots=True)
class Entry(Generic[T]):
    item: T
    tenant: str
    priority: Priority
    cost: float = 1.0


@dataclass(slots=True)
class _Flow(Generic[T]):
    """One tenant's waiting work of one priority, and its deficit-round-robin credit."""

    entries: deque[Entry[T]] = field(default_factory=deque)
    deficit: float = 0.0
    in_turn: bool = False


class _Lane(Generic[T]):
    """Deficit round robin over the tenants that have work of one priority."""

    def __init__(self, quantum: float) -> None:
        self._quantum = quantum
        self._flows: dict[str, _Flow[T]] = {}
        self._round: deque[str] = deque()  # tenants with work, in turn order
        self.depth = 0

    def push(self, entry: Entry[T]) -> None:
        flow = self._flows.get(entry.tenant)
        if flow is None:
            flow = self._flows[entry.tenant] = _Flow()
            self._round.append(entry.tenant)
        flow.entries.append(entry)
        self.depth += 1

    def pop(self) -> Entry[T] | None:
        while self._round:
            tenant = self._round[0]
            flow = self._flows[tenant]
            if not flow.in_turn:
                flow.deficit += self._quantum
                flow.in_turn = True
            head = flow.entries[0]
            if flow.deficit >= head.cost:
                flow.deficit -= head.cost
                flow.entries.popleft()
                self.depth -= 1
                if not flow.entries:
                    # An idle tenant banks no credit (DRR): it rejoins at the back, from zero.
                    self._round.popleft()
                    del self._flows[tenant]
                return head
            flow.in_turn = False
            self._round.rotate(-1)
        return None

    def shed_newest_of_largest(self) -> Entry[T] | None:
        """Remove the newest entry of the tenant with the most waiting (fairest to push out)."""
        if not self._flows:
            return None
        tenant = max(self._flows, key=lambda t: len(self._flows[t].entries))
        flow = self._flows[tenant]
        entry = flow.entries.pop()
        self.depth -= 1
        if not flow.entries:
            self._round.remove(tenant)
            del self._flows[tenant]
        return entry

    def tenants(self) -> int:
        return len(self._flows)


class FairQueue(Generic[T]):
    """Bounded per tenant and in total; `pop` serves cold before refresh, tenants in turn."""

    def __init__(self, *, max_depth: int, per_tenant_max: int, quantum: float = 1.0) -> None:
        if max_depth < 1 or per_tenant_max < 1:
            raise ValueError("queue bounds must be at least 1")
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.max_depth = max_depth
        self.per_tenant_max = per_tenant_max
        # Items per second the consumers are getting through; sets Retry-After on overflow.
        self.drain_rate = 1.0
        self._lanes: dict[Priority, _Lane[T]] = {p: _Lane(quantum) for p in PRIORITIES}
        self._per_tenant: dict[str, int] = {}
        self.rejected = 0
        self.shed = 0

    def __len__(self) -> int:
        return sum(lane.depth for lane in self._lanes.values())

    def depth(self, priority: Priority) -> int:
        return self._lanes[priority].depth

    def tenant_depth(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def tenants(self) -> int:
        return len(self._per_tenant)

    def push(
        self, item: T, *, tenant: str, priority: Priority, cost: float = 1.0
    ) -> Entry[T] | None:
        """Queue `item`; returns a refresh pushed out to make room, or None.

        Raises QueueFull (nothing queued) when the tenant or the whole queue is full.
        """
        if cost <= 0:
            raise ValueError("cost must be positive")
        waiting = self.tenant_depth(tenant)
        if waiting >= self.per_tenant_max:
            self.rejected += 1
            raise QueueFull(
                f"tenant {tenant} has {waiting} requests queued (limit {self.per_tenant_max})",
                scope=tenant,
                waiting=waiting,
                retry_after=self._retry_after(waiting),
            )
        shed: Entry[T] | None = None
        total = len(self)
        if total >= self.max_depth:
            if priority == "cold":
                shed = self._lanes["refresh"].shed_newest_of_largest()
            if shed is None:
                self.rejected += 1
                raise QueueFull(
                    f"queue full ({total} waiting)",
                    scope=TOTAL,
                    waiting=total,
                    retry_after=self._retry_after(total),
                )
            self._forget(shed.tenant)
            self.shed += 1
        self._lanes[priority].push(Entry(item, tenant, priority, cost))
        self._per_tenant[tenant] = waiting + 1
        return shed

    def pop(self) -> Entry[T] | None:
        """The next entry: any cold start before any refresh; None when empty."""
        for priority in PRIORITIES:
            entry = self._lanes[priority].pop()
            if entry is not None:
                self._forget(entry.tenant)
                return entry
        return None

    def _forget(self, tenant: str) -> None:
        left = self._per_tenant[tenant] - 1
        if left:
            self._per_tenant[tenant] = left
        else:
            del self._per_tenant[tenant]

    def _retry_after(self, waiting: int) -> float:
        # Come back when about half of what is waiting ahead has been served: soon enough that
        # the queue does not run dry, late enough that retries do not hammer the broker.
        seconds = waiting / max(self.drain_rate, 1e-3) / 2
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, seconds))
