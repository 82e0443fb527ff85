"""The broker's decision for one credential request, read top to bottom:

authenticate → decide (policy) → admit (tenant limits, the fleet's ticket) → get (the credential
stack) → audit → a frozen `Issued`, which the HTTP handler serialises.

Every outcome — issued, refreshed, denied, throttled, failed — is written to the audit log
*before* the reply leaves; if the audit log cannot be written, nothing is issued (fail closed).
A revocation is checked before the admission, inside the credential stack on the way up, and
once more before the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal, NoReturn, Protocol

from metaproxy.audit.record import EventName
from metaproxy.broker.answer import Issued
from metaproxy.broker.audit_trail import Grant
from metaproxy.broker.authenticator import Authenticator, RequestContext
from metaproxy.broker.credentials.guard import RevocationCheck
from metaproxy.broker.credentials.local import FetchCancelled
from metaproxy.broker.credentials.source import CredentialSource, Fetch, Priority, Scope
from metaproxy.broker.gate import FleetGate
from metaproxy.broker.store.base import CacheClaim
from metaproxy.errors import (
    BadRequest,
    Denied,
    MetaproxyError,
    RevocationsStale,
    RevokedWhileFetching,
    TooManyRequests,
)
from metaproxy.logs import task_var, tenant_var
from metaproxy.models import BrokerLimits, Decision, Identity, NodeFacts
from metaproxy.policy.evaluate import evaluate, tenant_for
from metaproxy.policy.model import PolicySet

_ROLE_REQUEST = re.compile(r"^(arn:aws[a-z-]*:iam::\d{12}:role/)?[\w+=,.@/-]{1,128}$")


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    role: str | None = None
    refresh: bool = False
    node: NodeFacts | None = None  # where the task runs, as its sidecar read its node's IMDS

    @classmethod
    def from_json(cls, body: object) -> CredentialRequest:
        """Strict: an object with only known keys of the right types (see the PATH=null lesson)."""
        if not isinstance(body, dict):
            raise BadRequest("body is not a JSON object", public_message="body must be an object")
        unknown = set(body) - {"role", "refresh", "node"}
        if unknown:
            raise BadRequest(public_message=f"unknown field: {sorted(unknown)[0][:40]}")
        role = body.get("role")
        if role is not None and (not isinstance(role, str) or not _ROLE_REQUEST.match(role)):
            raise BadRequest(public_message="role must be a role name or role ARN")
        refresh = body.get("refresh", False)
        if not isinstance(refresh, bool):
            raise BadRequest(public_message="refresh must be a boolean")
        node = None
        if "node" in body:
            try:
                node = NodeFacts.parse(body["node"], strict=True)
            except ValueError as exc:
                raise BadRequest(public_message=str(exc)) from None
        return cls(role or None, refresh, node)


class Policies(Protocol):
    """The policy set in force (the store's, reloaded on change)."""

    @property
    def current(self) -> PolicySet: ...


class Revocations(RevocationCheck, Protocol):
    """The revocation view as the issuer asks it: revoked? can it tell? how old is it?"""

    def age(self) -> float: ...


class Decisions(Protocol):
    """The audit trail as the issuer writes to it (`refusals.RefusalSummaries`): outcomes as
    they happen; refusals in full once per identity, cause and window, then counted."""

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
    ) -> None: ...

    async def refused(
        self,
        event: Literal["denied", "throttled"],
        ctx: RequestContext,
        identity: Identity,
        decision: Decision | None,
        *,
        reason: str,
        status: int,
        tenant: str = "",
    ) -> bool: ...


class Issuer:
    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policies: Policies,
        gate: FleetGate,
        revocations: Revocations,
        source: CredentialSource,
        audit: Decisions,
    ) -> None:
        self.authenticator = authenticator
        self.policies = policies
        self.gate = gate
        self.revocations = revocations
        self.source = source
        self.audit = audit

    async def issue(
        self, token: str | None, request: CredentialRequest, ctx: RequestContext
    ) -> Issued:
        identity = await self.authenticator.authenticate(token, ctx)
        task_var.set(identity.task)
        policies = self.policies.current
        tenant_policy = tenant_for(policies, identity)
        tenant = tenant_policy.tenant if tenant_policy else ""
        tenant_var.set(tenant)
        limits = tenant_policy.broker_limits if tenant_policy else BrokerLimits()
        # Deciding is pure (no await, no effect), so it comes before the admission: a cold
        # request's first question to the fleet's cache then travels with the admission.
        decision = evaluate(policies, identity, request.role)
        fetch = self._fetch_for(identity, decision, request)
        try:
            async with self.gate.admit(
                tenant or "-", identity.subject, limits, self._claim(fetch)
            ) as ticket:
                if fetch is not None:
                    fetch = replace(fetch, ticket=ticket)
                return await self._issue_admitted(identity, decision, request, ctx, fetch)
        except TooManyRequests as exc:
            exc.quiet = await self.audit.refused(
                "throttled", ctx, identity, None, reason=exc.detail, status=429, tenant=tenant
            )
            raise

    @staticmethod
    def _fetch_for(
        identity: Identity, decision: Decision, request: CredentialRequest
    ) -> Fetch | None:
        if not decision.allowed or decision.spec is None:
            return None
        priority: Priority = "refresh" if request.refresh else "cold"
        return Fetch(decision.spec, decision.tenant, identity.task, priority)

    def _claim(self, fetch: Fetch | None) -> CacheClaim | None:
        """The fleet cache's question, for a request that will get that far: allowed, and not
        revoked as far as this replica can tell."""
        if fetch is None or self.revocations.stale():
            return None
        if self.revocations.check(fetch.tenant, fetch.task):
            return None
        return self.source.claim(fetch)

    async def _issue_admitted(
        self,
        identity: Identity,
        decision: Decision,
        request: CredentialRequest,
        ctx: RequestContext,
        fetch: Fetch | None,
    ) -> Issued:
        try:
            await self._refuse_if_revoked_or_denied(identity, decision, ctx)
        except MetaproxyError:
            if fetch is not None:
                # Refused after its admission took the fleet's lease (a revocation arrived
                # meanwhile): give it back now rather than make other replicas wait it out.
                self.source.release(fetch)
            raise
        assert fetch is not None  # allowed: it has a spec
        try:
            fetched = await self.source.get(fetch)
        except (FetchCancelled, RevokedWhileFetching):
            fetched = None
        except MetaproxyError as exc:
            await self.audit.decision(
                "failed", ctx, identity, decision, reason=exc.detail, status=exc.status
            )
            raise
        # A revocation may have arrived while this request waited — in the queue, for the
        # budget, for another replica's call, at STS: checked again before anything is
        # answered, and what came back is neither served nor kept.
        await self._refuse_if_revoked_since(identity, decision, ctx, fetched=fetched is not None)
        assert fetched is not None  # a cancelled fetch only ever comes from a revocation
        role = fetched.role
        await self.audit.decision(
            "refreshed" if fetched.renewal else "issued",
            ctx,
            identity,
            decision,
            reason=f"{decision.reason} (from {fetched.origin})",
            status=200,
            grant=Grant(role.credentials, role.via_access_key_id, role.packed_policy_size),
        )
        return Issued(ctx, identity, decision, fetched, request.node)

    async def _refuse_if_revoked_or_denied(
        self, identity: Identity, decision: Decision, ctx: RequestContext
    ) -> None:
        """The audited refusal, if any: stale revocations, revoked, denied by policy."""
        if self.revocations.stale():
            # Fail closed: a task revoked through another replica may be missing from our view.
            detail = (
                f"revocation view {self.revocations.age():.0f}s old (store unreachable); "
                "refusing to issue"
            )
            await self.audit.decision("failed", ctx, identity, decision, reason=detail, status=503)
            raise RevocationsStale(detail, retry_after=5.0)
        revoked = self.revocations.check(decision.tenant, identity.task)
        if revoked:
            await self._deny(identity, decision, ctx, revoked)
        if not decision.allowed or decision.spec is None:
            await self._deny(identity, decision, ctx, decision.reason)

    async def _refuse_if_revoked_since(
        self, identity: Identity, decision: Decision, ctx: RequestContext, *, fetched: bool
    ) -> None:
        """After the fetch, before the answer: refuse (and drop the task's sets here) if the
        task was revoked meanwhile, or if this replica can no longer tell."""
        revoked = self.revocations.check(decision.tenant, identity.task)
        if not revoked and not self.revocations.stale() and fetched:
            return
        self.source.drop(Scope(decision.tenant, identity.task))
        if revoked or not fetched:
            reason = f"{revoked or 'revoked'} while its credentials were being fetched"
            await self._deny(identity, decision, ctx, reason)
        detail = f"revocation view {self.revocations.age():.0f}s old at the answer; refusing"
        await self.audit.decision("failed", ctx, identity, decision, reason=detail, status=503)
        raise RevocationsStale(detail, retry_after=5.0)

    async def _deny(
        self, identity: Identity, decision: Decision, ctx: RequestContext, reason: str
    ) -> NoReturn:
        """403, audited in full or counted in its identity's window (then logged quietly)."""
        refused = Denied(reason)
        refused.quiet = await self.audit.refused(
            "denied", ctx, identity, decision, reason=reason, status=403
        )
        raise refused
