"""What a refused caller with a valid token may cost: one full record per identity, cause and
window, and a summary of the rest.

A pod looping on a 403 (a revoked task, a role its policy does not allow) or a 429 (over its
tenant's rate) used to cost one fsynced audit record per answer: 1.3 MB/s from one pod. Now the
first refusal of each (tenant, task, event, status, rule) within the window is recorded in full
and the rest are counted, answered as before without a log line, and written as one summary
record with `count` when the window ends (`summaries.py`). The rule is the policy's (which role
entry, or `no-tenant`, `role-not-allowed` …, or `limits` for a 429), so a new cause, such as a
revocation arriving while a task is being refused by policy, is still recorded in full.

Everything else (issued, refreshed, failed) is written as it happens, through the same trail.
"""

from __future__ import annotations

from typing import Literal

from metaproxy.audit.record import EventName
from metaproxy.broker.audit_trail import AuditTrail, Grant
from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.summaries import WINDOW_SECONDS, SummaryWindows
from metaproxy.clock import Clock
from metaproxy.models import Decision, Identity

Refusal = Literal["denied", "throttled"]
_Key = tuple[str, str, str, int, str]  # tenant, task, event, status, rule


class RefusalSummaries:
    """The issuer's audit trail, with its refusals of authenticated callers summarised."""

    def __init__(self, trail: AuditTrail, clock: Clock, *, window: float = WINDOW_SECONDS) -> None:
        self._trail = trail
        self._windows: SummaryWindows[_Key] = SummaryWindows(
            trail, clock, name="refusal-summaries", window=window
        )
        self.summarised = 0  # refusals answered without their own record (metrics, tests)

    async def start(self) -> None:
        await self._windows.start()

    async def aclose(self) -> None:
        """Write every pending summary (before the audit log closes)."""
        await self._windows.aclose()

    async def flush(self, *, everything: bool = False) -> int:
        """Write the summaries of ended windows (of all with `everything`); how many."""
        return await self._windows.flush(everything=everything)

    async def decision(
        self,
        event: EventName,
        ctx: RequestContext,
        identity: Identity,
        decision: Decision | None,
        *,
        reason: str,
        status: int,
        tenant: str = "",
        grant: Grant | None = None,
    ) -> None:
        """An outcome written as it happens (`AuditTrail.decision`)."""
        await self._trail.decision(
            event, ctx, identity, decision, reason=reason, status=status, tenant=tenant, grant=grant
        )

    async def refused(
        self,
        event: Refusal,
        ctx: RequestContext,
        identity: Identity,
        decision: Decision | None,
        *,
        reason: str,
        status: int,
        tenant: str = "",
    ) -> bool:
        """Account for one refusal: record it in full, or count it in its window (True: the
        caller answers it quietly, its record is the window's summary). AuditUnavailable when
        the full record cannot be written."""
        record = self._trail.decision_event(
            event, ctx, identity, decision, reason=reason, status=status, tenant=tenant
        )
        key = (record.tenant, record.task, record.event, record.status, record.rule)
        if self._windows.repeat(key):
            self.summarised += 1
            return True
        # Opened before the write: refusals arriving while it is written are its repeats.
        self._windows.opens(key, record)
        await self._trail.append(record)
        return False
