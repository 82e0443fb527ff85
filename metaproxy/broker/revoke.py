"""Revoking and lifting, as the control API does them, for the whole fleet.

A revocation is durable in the store before it is acknowledged, applied to this replica's view
at once (the store's push brings it to the others), and drops the cached credentials it covers
here (the view hands it to the credential stack: sets and fetches in flight) and in the fleet's
shared cache. Each step that changes state is one audit record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from metaproxy.broker.audit_trail import AuditTrail
from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.authn import FailedAuthentications
from metaproxy.broker.credentials.fleet import FleetCache
from metaproxy.broker.credentials.source import Scope
from metaproxy.broker.issuer import Policies
from metaproxy.broker.revocation import RevocationView, revocation_scope
from metaproxy.broker.store.base import (
    Lift,
    Revocation,
    RevocationEvent,
    RevocationStore,
    StoreUnavailable,
)
from metaproxy.clock import Clock, iso_z
from metaproxy.errors import Unauthenticated, Unavailable
from metaproxy.net.httperrors import new_request_id
from metaproxy.policy.revoke_deny import deny_policy

# Between the broker's clock and STS's, and for an STS call under way when a replica learns.
DENY_MARGIN_SECONDS = 60.0


class StoreDown(Unavailable):
    code = "StoreUnavailable"
    public_message = "the fleet store is unreachable; nothing was changed, retry later"


def deny_cutoff(revoked_at: datetime, max_staleness: float) -> str:
    """Until when the printed deny must reach: every credential the fleet may still have minted
    and handed out for the task. This replica refuses at once, and re-checks every fetch before
    it answers; another replica may not have heard yet — it re-reads the store, or refuses to
    issue once its view is older than `--revocation-max-staleness`."""
    return iso_z(revoked_at + timedelta(seconds=max_staleness + DENY_MARGIN_SECONDS))


def _by(ctx: RequestContext, instance: str) -> str:
    """Who asked, as a revocation records it: the operator, from where, through which replica."""
    where = f"{ctx.peer} via {instance}"
    return f"{ctx.operator} ({where})" if ctx.operator else where


@dataclass(frozen=True, slots=True)
class Listing:
    revocations: list[Revocation]
    view_age_seconds: float
    stale: bool


class Revoker:
    def __init__(
        self,
        store: RevocationStore,
        view: RevocationView,
        *,
        fleet: FleetCache | None,
        policies: Policies,
        audit: AuditTrail,
        clock: Clock,
        max_staleness: float,
        failures: FailedAuthentications,
    ) -> None:
        self._store = store
        self._view = view
        self._fleet = fleet
        self._policies = policies
        self._audit = audit
        self._clock = clock
        self._max_staleness = max_staleness
        self._failures = failures

    def knows(self, tenant: str) -> bool:
        """Whether a policy names `tenant` (a name none does is a typo, not a success)."""
        return tenant in self._policies.current.tenants

    async def revoke(self, tenant: str, task: str, ctx: RequestContext) -> dict[str, Any]:
        by = _by(ctx, self._audit.instance)
        entry = Revocation(tenant=tenant, task=task, at=iso_z(self._clock.now()), by=by)
        scope = revocation_scope(tenant, task)
        try:
            await self._store.add(entry)
        except StoreUnavailable as exc:
            await self._audit.operator(
                "failed",
                ctx,
                tenant=tenant,
                task=task,
                reason=f"revoke {scope}: store down ({exc})",
                status=503,
            )
            raise StoreDown(f"revoke {scope}: store unreachable") from None
        # This replica refuses at once, and drops what it holds; the others when the push (or
        # their resync) reaches them.
        dropped = self._view.apply(RevocationEvent("revoke", entry))
        shared = 0
        if self._fleet is not None:
            try:
                # Expired from the store in any case before the sidecars' floor; purged now so
                # a lifted task starts with credentials issued after the IAM deny's cut-off.
                shared = await self._fleet.purge(Scope(tenant, task))
            except StoreUnavailable:
                shared = 0
        tenant_policy = self._policies.current.tenants[tenant]
        await self._audit.operator(
            "revoked",
            ctx,
            tenant=tenant,
            task=task,
            reason=f"{scope} revoked by operator; "
            f"{dropped.sets} cached sets dropped here, {shared} from the shared cache",
            status=200,
        )
        cutoff = deny_cutoff(self._clock.now(), self._max_staleness)
        return {
            "revoked": {"tenant": tenant, "task": task, "at": entry.at, "by": entry.by},
            # The same sets usually sit in both: this replica's cache and the fleet's shared one.
            "dropped": {"replica": dropped.sets, "shared": shared},
            "roles": sorted({*dropped.roles, *(role.arn for role in tenant_policy.roles)}),
            "deny_policy": deny_policy(tenant_policy, task, cutoff),
            "deny_covers_sessions_issued_before": cutoff,
        }

    async def lift(self, tenant: str, task: str, ctx: RequestContext) -> dict[str, Any] | None:
        by = _by(ctx, self._audit.instance)
        lift = Lift(tenant, task, at=iso_z(self._clock.now()), by=by)
        scope = revocation_scope(tenant, task)
        try:
            lifted = await self._store.remove(lift)
        except StoreUnavailable as exc:
            await self._audit.operator(
                "failed",
                ctx,
                tenant=tenant,
                task=task,
                reason=f"lift {scope}: store down ({exc})",
                status=503,
            )
            raise StoreDown(f"lift {scope}: store unreachable") from None
        if lifted is None:
            return None
        self._view.apply(RevocationEvent("lift", lifted, lift))
        await self._audit.operator(
            "lifted",
            ctx,
            tenant=tenant,
            task=task,
            reason=f"revocation of {scope} (at {lifted.at}) lifted by operator",
            status=200,
        )
        return {"lifted": {"tenant": tenant, "task": task, "at": lifted.at, "by": lifted.by}}

    async def listing(self, ctx: RequestContext) -> Listing:
        entries = self._view.entries()
        await self._audit.operator(
            "listed", ctx, reason=f"{len(entries)} revocations listed", status=200
        )
        return Listing(entries, self._view.age(), self._view.stale())

    async def restore(self, lost: list[Revocation]) -> None:
        """Revocations the store lost (it came back with fewer, and no lift covers them):
        written back as they were, each with an audit record, so the fleet keeps them."""
        for entry in lost:
            try:
                await self._store.add(entry)
                outcome = "written back"
            except StoreUnavailable:
                outcome = "kept here; writing back failed (store down), retried at the next re-read"
            await self._audit.operator(
                "restored",
                RequestContext(f"integrity-{new_request_id()}", ""),  # a re-read, not a request
                tenant=entry.tenant,
                task=entry.task,
                rule="revocation-integrity",
                reason=f"{revocation_scope(entry.tenant, entry.task)} (revoked at {entry.at} by "
                f"{entry.by}) was missing from the store without a lift: kept in force, {outcome}",
                status=200,
            )

    async def refused(self, refusal: Unauthenticated, ctx: RequestContext) -> None:
        """A control request without the right token: audited (an operator's credential, and
        its misuse must show), a peer's repeats summarised, a peer over its budget refused
        with 429 before it costs a record (`authn.FailedAuthentications`)."""
        await self._failures.failed(refusal, ctx.request_id, ctx.peer)
