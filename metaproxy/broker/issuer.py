"""The broker's decision path for one credential request:

authenticate → tenant limits → policy → cache / coalesce → STS (via the scheduler) → audit → reply.

Every outcome — issued, refreshed, denied, throttled, failed — is written to the audit log
*before* the reply leaves; if the audit log cannot be written, nothing is issued (fail closed).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaproxy.audit.record import make_record
from metaproxy.audit.writer import AuditLog
from metaproxy.broker.admission import FairAdmission, lane_for
from metaproxy.broker.authn import FailedAuthentications
from metaproxy.broker.cache import CredentialCache, FetchCancelled, Key
from metaproxy.broker.instrument import note_source
from metaproxy.broker.metadata import build_metadata
from metaproxy.broker.revocation import RevocationView
from metaproxy.broker.scheduler import Priority, StsScheduler
from metaproxy.broker.shared_cache import SharedCredentials, owner_names
from metaproxy.broker.store.base import CacheClaim, CacheLook
from metaproxy.broker.sts import AssumedRole
from metaproxy.broker.tenant_limits import TenantLimiter
from metaproxy.clock import Clock, iso_z
from metaproxy.errors import (
    BadRequest,
    Denied,
    MetaproxyError,
    RevocationsStale,
    RevokedWhileFetching,
    TooManyRequests,
    Unauthenticated,
)
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.logs import task_var, tenant_var
from metaproxy.models import AssumeRoleSpec, BrokerLimits, Decision, Identity, NodeFacts
from metaproxy.policy.evaluate import evaluate, tenant_for
from metaproxy.policy.store import PolicyStore

log = logging.getLogger("metaproxy.broker")

_ROLE_REQUEST = re.compile(r"^(arn:aws[a-z-]*:iam::\d{12}:role/)?[\w+=,.@/-]{1,128}$")
_ACCOUNT = re.compile(r":iam::(\d{12}):")
MAX_TRACKED_KEYS = 200_000  # twice the cache's own bound; the oldest owners are forgotten first


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


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    peer: str


class Issuer:
    def __init__(
        self,
        *,
        verifier: IdentityVerifier,
        policies: PolicyStore,
        cache: CredentialCache,
        scheduler: StsScheduler,
        audit: AuditLog,
        limiter: TenantLimiter,
        revocations: RevocationView,
        shared: SharedCredentials | None,
        clock: Clock,
        instance: str,
        region: str,
        availability_zone: str,
        document_key: Path | None,
        admission: FairAdmission | None = None,
    ) -> None:
        self.admission = admission or FairAdmission()
        self.verifier = verifier
        self.policies = policies
        self.cache = cache
        self.scheduler = scheduler
        self.audit = audit
        self.limiter = limiter
        self.revocations = revocations
        self.shared = shared
        self.clock = clock
        self.instance = instance
        self.region = region
        self.availability_zone = availability_zone
        self.document_key = document_key
        # Before verification is cheap; what a failure costs (records, log lines) is bounded.
        self.failures = FailedAuthentications(audit, clock, instance)
        self._started = clock.now()
        self._metadata: OrderedDict[tuple[object, ...], dict[str, Any]] = OrderedDict()
        # Which (tenant, task) each cache key was issued to, so a revocation drops exactly
        # their cached sets and no one else's.
        self._owners: OrderedDict[Key, tuple[str, str]] = OrderedDict()

    async def issue(
        self, token: str | None, request: CredentialRequest, ctx: RequestContext
    ) -> dict[str, Any]:
        await self.admission.wait_turn(lane_for(token))
        identity = await self._authenticate(token, ctx)
        task_var.set(identity.task)
        policies = self.policies.current
        tenant_policy = tenant_for(policies, identity)
        tenant = tenant_policy.tenant if tenant_policy else ""
        tenant_var.set(tenant)
        limits = tenant_policy.broker_limits if tenant_policy else BrokerLimits()
        # Deciding is pure (no await, no effect), so it comes before the admission: a cold
        # request's first question to the fleet's cache then travels with the admission.
        decision = evaluate(policies, identity, request.role)
        claim = self._cache_claim(identity, decision)
        try:
            async with self.limiter.admit(tenant or "-", identity.subject, limits, claim) as look:
                return await self._issue_allowed(identity, decision, request, ctx, look)
        except TooManyRequests as exc:
            await self._audit(
                "throttled", ctx, identity, None, reason=exc.detail, status=429, tenant=tenant
            )
            raise

    def _cache_claim(self, identity: Identity, decision: Decision) -> CacheClaim | None:
        """The shared cache's question for a request that will need it: allowed, not revoked,
        and nothing in this replica's cache to serve or already being fetched."""
        if self.shared is None or decision.spec is None or not decision.allowed:
            return None
        if self.revocations.stale() or self.revocations.check(decision.tenant, identity.task):
            return None
        key = decision.spec.cache_key
        return self.shared.claim_for(key) if self.cache.would_fetch(key) else None

    async def _authenticate(self, token: str | None, ctx: RequestContext) -> Identity:
        try:
            if not token:
                raise Unauthenticated("no bearer token", reason="missing")
            return self.verifier.verify(token)
        except Unauthenticated as exc:
            await self.failures.failed(exc, ctx.request_id, ctx.peer)
            raise

    async def _issue_allowed(
        self,
        identity: Identity,
        decision: Decision,
        request: CredentialRequest,
        ctx: RequestContext,
        look: CacheLook | None = None,
    ) -> dict[str, Any]:
        """`look`: the shared cache's answer that came with the admission, if any."""
        try:
            spec = await self._issuable(identity, decision, ctx)
        except MetaproxyError:
            # Refused after its admission took the fleet's lease (a revocation that arrived
            # meanwhile): give the lease back now rather than make other replicas wait it out.
            if look is not None and look.holding and self.shared is not None and decision.spec:
                self.shared.let_go(decision.spec.cache_key)
            raise
        key = spec.cache_key
        priority: Priority = "refresh" if request.refresh or self.cache.has_valid(key) else "cold"
        # The broker's own record decides, never the request's `refresh` flag: a client that
        # called its first grant a refresh hid it from `audit query --event issued`.
        seen = self._owners.get(key) == (decision.tenant, identity.task)
        # Known before the fetch starts, so a revocation that arrives meanwhile finds the key
        # and cancels the fetch (`forget`).
        self._remember_owner(key, decision.tenant, identity.task)
        try:
            result = await self.cache.get(
                key, self._fetcher(key, spec, decision.tenant, identity.task, priority, look=look)
            )
        except (FetchCancelled, RevokedWhileFetching):
            result = None
        except MetaproxyError as exc:
            await self._audit(
                "failed", ctx, identity, decision, reason=exc.detail, status=exc.status
            )
            raise
        # A revocation may have arrived while this request waited — in the queue, for the
        # budget, for another replica's call, at STS: checked again before anything is
        # answered, and what came back is neither served nor kept.
        await self._still_issuable(identity, decision, ctx, key, fetched=result is not None)
        assert result is not None  # a cancelled fetch only ever comes from a revocation
        note_source(result.source)
        event = "refreshed" if seen else "issued"
        credentials = result.role.credentials
        await self._audit(
            event,
            ctx,
            identity,
            decision,
            reason=f"{decision.reason} (from {result.source})",
            status=200,
            access_key_id=credentials.access_key_id,
            expiration=iso_z(credentials.expiration),
            via_access_key_id=result.role.via_access_key_id,
            packed_policy_size=result.role.packed_policy_size,
        )
        account = _ACCOUNT.search(spec.role_arn)
        account_id = account.group(1) if account else ""
        entry = self.cache.peek(key)
        issued_at = entry.fetched_at if entry is not None else self.clock.now()
        return {
            "request_id": ctx.request_id,
            "tenant": decision.tenant,
            "task": identity.task,
            "role_name": decision.role_name,
            "role_arn": decision.role_arn,
            "assumed_role_arn": result.role.assumed_role_arn,
            "account_id": account_id,
            "credentials": {
                "access_key_id": credentials.access_key_id,
                "secret_access_key": credentials.secret_access_key,
                "session_token": credentials.session_token,
                "expiration": iso_z(credentials.expiration),
                "issued_at": iso_z(issued_at),
            },
            "metadata": self._metadata_view(identity, decision, account_id, ctx.peer, request.node),
            "limits": decision.sidecar_limits.to_json(),
        }

    async def _issuable(
        self, identity: Identity, decision: Decision, ctx: RequestContext
    ) -> AssumeRoleSpec:
        """The spec to issue, or the audited refusal: stale revocations, revoked, denied."""
        if self.revocations.stale():
            # Fail closed: a task revoked through another replica may be missing from our view.
            age = self.revocations.age()
            detail = f"revocation view {age:.0f}s old (store unreachable); refusing to issue"
            await self._audit("failed", ctx, identity, decision, reason=detail, status=503)
            raise RevocationsStale(detail, retry_after=5.0)
        revoked = self.revocations.check(decision.tenant, identity.task)
        if revoked:
            await self._audit("denied", ctx, identity, decision, reason=revoked, status=403)
            raise Denied(revoked)
        if not decision.allowed or decision.spec is None:
            await self._audit("denied", ctx, identity, decision, reason=decision.reason, status=403)
            raise Denied(decision.reason)
        return decision.spec

    async def _still_issuable(
        self,
        identity: Identity,
        decision: Decision,
        ctx: RequestContext,
        key: Key,
        *,
        fetched: bool,
    ) -> None:
        """After the fetch, before the answer: refuse (and drop the set from both caches) if the
        task was revoked meanwhile, or if this replica can no longer tell."""
        tenant, task = decision.tenant, identity.task
        revoked = self.revocations.check(tenant, task)
        if not revoked and not self.revocations.stale() and fetched:
            return
        self.cache.drop(lambda k: k == key)
        if self.shared is not None:
            self.shared.drop_task(tenant, task)
        if revoked or not fetched:
            reason = f"{revoked or 'revoked'} while its credentials were being fetched"
            await self._audit("denied", ctx, identity, decision, reason=reason, status=403)
            raise Denied(reason)
        detail = f"revocation view {self.revocations.age():.0f}s old at the answer; refusing"
        await self._audit("failed", ctx, identity, decision, reason=detail, status=503)
        raise RevocationsStale(detail, retry_after=5.0)

    def _refuse_revoked(self, tenant: str, task: str) -> None:
        """Between STS and the caches: a set fetched for a task revoked meanwhile is never
        stored, here or in the fleet's shared cache."""
        revoked = self.revocations.check(tenant, task)
        if revoked or self.revocations.stale():
            raise RevokedWhileFetching(revoked or "revocations stale")

    def _remember_owner(self, key: Key, tenant: str, task: str) -> None:
        self._owners[key] = (tenant, task)
        self._owners.move_to_end(key)
        if len(self._owners) > MAX_TRACKED_KEYS:
            self._owners.popitem(last=False)

    def _fetcher(
        self,
        key: Key,
        spec: AssumeRoleSpec,
        tenant: str,
        task: str,
        priority: Priority,
        *,
        look: CacheLook | None,
    ) -> Callable[[], Awaitable[AssumedRole]]:
        """STS through the scheduler, behind the fleet's shared cache where there is one."""

        async def assume() -> AssumedRole:
            role = await self.scheduler.submit(spec, tenant=tenant, priority=priority)
            self._refuse_revoked(tenant, task)  # before the shared cache stores it
            return role

        shared = self.shared
        if shared is None:
            return assume

        async def fetch() -> AssumedRole:
            role = await shared.fetch(key, owner_names(tenant, task), assume, look)
            self._refuse_revoked(tenant, task)  # another replica's set: not into ours either
            return role

        return fetch

    def forget(self, tenant: str, task: str) -> tuple[int, list[str]]:
        """Drop this replica's cached credentials of a revoked task (or, task == "", of every
        task of the tenant). Returns how many sets went and the role ARNs they were for."""
        doomed = {
            key
            for key, (owner_tenant, owner_task) in self._owners.items()
            if owner_tenant == tenant and (not task or owner_task == task)
        }
        dropped = self.cache.drop(lambda key: key in doomed)
        for key in doomed:
            del self._owners[key]
        return dropped, sorted({str(key[0]) for key in doomed})

    def _metadata_view(
        self,
        identity: Identity,
        decision: Decision,
        account_id: str,
        peer: str,
        node: NodeFacts | None,
    ) -> dict[str, Any]:
        # Signing is cheap but not free; the view only changes with these inputs.
        key = (decision.tenant, identity.task, decision.role_name, account_id, peer, node)
        view = self._metadata.get(key)
        if view is None:
            view = build_metadata(
                identity=identity,
                decision=decision,
                account_id=account_id,
                region=self.region,
                availability_zone=self.availability_zone,
                peer=peer,
                started=self._started,
                document_key=self.document_key,
                node=node,
            )
            self._metadata[key] = view
            if len(self._metadata) > 10_000:
                self._metadata.popitem(last=False)
        return view

    async def _audit(
        self,
        event: str,
        ctx: RequestContext,
        identity: Identity,
        decision: Decision | None,
        *,
        reason: str,
        status: int,
        tenant: str = "",
        access_key_id: str = "",
        expiration: str = "",
        via_access_key_id: str = "",
        packed_policy_size: int | None = None,
    ) -> None:
        spec = decision.spec if decision else None
        # A chain sets SourceIdentity on its first hop; it persists into the role's session.
        first = spec.via if spec is not None and spec.via is not None else spec
        await self.audit.append(
            make_record(
                event,
                request_id=ctx.request_id,
                task=identity.task,
                tenant=decision.tenant if decision else tenant,
                team=decision.team if decision else "",
                subject=identity.subject,
                issuer=identity.issuer,
                token_id=identity.token_id,
                role_arn=decision.role_arn if decision else "",
                via_role_arn=spec.via.role_arn if spec and spec.via else "",
                via_access_key_id=via_access_key_id,
                session_name=spec.role_session_name if spec else "",
                source_identity=first.source_identity if first else "",
                access_key_id=access_key_id,
                expiration=expiration,
                policy_digest=decision.policy_digest if decision else "",
                rule=decision.rule if decision else "limits",
                reason=reason,
                peer=ctx.peer,
                instance=self.instance,
                status=status,
                packed_policy_size=packed_policy_size,
            )
        )
