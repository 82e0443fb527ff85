"""The broker's audit records, built in one place from the values a decision already has.

Each is an `AuditEvent` (audit/record.py: checked when built, redacted when written). The
replica's name (`instance`) is bound once here, for every event; a request's context
(`RequestContext`: request id and peer) once per event, by `decision` and `operator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from metaproxy.audit.record import AuditEvent, EventName
from metaproxy.broker.authenticator import RequestContext
from metaproxy.clock import iso_z
from metaproxy.models import Credentials, Decision, Identity


@dataclass(frozen=True, slots=True)
class Grant:
    """What an issued record adds: which credentials, until when, and how they were made."""

    credentials: Credentials
    via_access_key_id: str = ""
    packed_policy_size: int | None = None


class AuditSink(Protocol):
    """Where records go: the audit chain's writer (`AuditLog`), or a wrapper of it."""

    async def append(self, record: Mapping[str, object]) -> dict[str, object]: ...


class AuditTrail:
    def __init__(self, log: AuditSink, instance: str) -> None:
        self.log = log
        self.instance = instance

    async def append(self, event: AuditEvent) -> None:
        """Write `event`, built elsewhere (authn.py), as this replica's (AuditUnavailable when
        the log cannot take it)."""
        await self._write(replace(event, instance=self.instance))

    async def _write(self, event: AuditEvent) -> None:
        await self.log.append(event.record())

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
        """A credential request's outcome: issued, refreshed, denied, throttled or failed."""
        await self._write(
            self.decision_event(
                event,
                ctx,
                identity,
                decision,
                reason=reason,
                status=status,
                tenant=tenant,
                grant=grant,
            )
        )

    def decision_event(
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
    ) -> AuditEvent:
        """The record of a credential request's outcome, as `decision` writes it."""
        spec = decision.spec if decision else None
        # A chain sets SourceIdentity on its first hop; it persists into the role's session.
        first = spec.via if spec is not None and spec.via is not None else spec
        return AuditEvent(
            event=event,
            request_id=ctx.request_id,
            peer=ctx.peer,
            instance=self.instance,
            task=identity.task,
            tenant=decision.tenant if decision else tenant,
            team=decision.team if decision else "",
            subject=identity.subject,
            issuer=identity.issuer,
            token_id=identity.token_id,
            role_arn=decision.role_arn if decision else "",
            via_role_arn=spec.via.role_arn if spec and spec.via else "",
            via_access_key_id=grant.via_access_key_id if grant else "",
            session_name=spec.role_session_name if spec else "",
            source_identity=first.source_identity if first else "",
            access_key_id=grant.credentials.access_key_id if grant else "",
            expiration=iso_z(grant.credentials.expiration) if grant else "",
            policy_digest=decision.policy_digest if decision else "",
            rule=decision.rule if decision else "limits",
            reason=reason,
            status=status,
            packed_policy_size=grant.packed_policy_size if grant else None,
        )

    async def operator(
        self,
        event: EventName,
        ctx: RequestContext,
        *,
        reason: str,
        status: int,
        tenant: str = "",
        task: str = "",
        rule: str = "control",
    ) -> None:
        """An operator's request through the control API, or what the broker did on its own
        account (`rule` says which: control, control-authentication, revocation-integrity)."""
        await self._write(
            AuditEvent(
                event=event,
                request_id=ctx.request_id,
                peer=ctx.peer,
                operator=ctx.operator,
                instance=self.instance,
                task=task,
                tenant=tenant,
                rule=rule,
                reason=reason,
                status=status,
            )
        )
