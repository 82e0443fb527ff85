"""A bounded, fair queue of STS work: deficit round robin across tenants, cold starts first.

Why each rule exists (a credentials provider once fell behind a growing fleet; its single FIFO
queue reached tens of thousands and every new deployment failed):
- Depth is bounded, in total and per tenant; overflow is refused at once with `Overloaded`
  (503 + Retry-After) instead of queueing work that will time out anyway.
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
MAX_RETRY_AFTER = 10.0  # a guess further ahead than this is not worth trusting


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

        Raises Overloaded (nothing queued) when the tenant or the whole queue is full.
        """
        if cost <= 0:
            raise ValueError("cost must be positive")
        waiting = self.tenant_depth(tenant)
        if waiting >= self.per_tenant_max:
            self.rejected += 1
            raise Overloaded(
                f"tenant {tenant} has {waiting} requests queued (limit {self.per_tenant_max})",
                retry_after=self._retry_after(waiting),
            )
        shed: Entry[T] | None = None
        total = len(self)
        if total >= self.max_depth:
            if priority == "cold":
                shed = self._lanes["refresh"].shed_newest_of_largest()
            if shed is None:
                self.rejected += 1
                raise Overloaded(
                    f"queue full ({total} waiting)", retry_after=self._retry_after(total)
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
