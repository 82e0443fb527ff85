"""The broker's audit records, built in one place from the values a decision already has.

Every record carries the replica (`instance`), bound once here, and its request's context
(`RequestContext`: request id and peer); `make_record` (audit/record.py) validates each field
and scrubs anything credential-shaped before it reaches the log.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaproxy.audit.record import make_record
from metaproxy.audit.writer import AuditLog
from metaproxy.broker.authenticator import RequestContext
from metaproxy.clock import iso_z
from metaproxy.models import Credentials, Decision, Identity


@dataclass(frozen=True, slots=True)
class Grant:
    """What an issued record adds: which credentials, until when, and how they were made."""

    credentials: Credentials
    via_access_key_id: str = ""
    packed_policy_size: int | None = None


class AuditTrail:
    def __init__(self, log: AuditLog, instance: str) -> None:
        self.log = log
        self.instance = instance

    async def decision(
        self,
        event: str,
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
        spec = decision.spec if decision else None
        # A chain sets SourceIdentity on its first hop; it persists into the role's session.
        first = spec.via if spec is not None and spec.via is not None else spec
        await self.log.append(
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
                via_access_key_id=grant.via_access_key_id if grant else "",
                session_name=spec.role_session_name if spec else "",
                source_identity=first.source_identity if first else "",
                access_key_id=grant.credentials.access_key_id if grant else "",
                expiration=iso_z(grant.credentials.expiration) if grant else "",
                policy_digest=decision.policy_digest if decision else "",
                rule=decision.rule if decision else "limits",
                reason=reason,
                peer=ctx.peer,
                instance=self.instance,
                status=status,
                packed_policy_size=grant.packed_policy_size if grant else None,
            )
        )

    async def operator(
        self,
        event: str,
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
        await self.log.append(
            make_record(
                event,
                request_id=ctx.request_id,
                task=task,
                tenant=tenant,
                rule=rule,
                reason=reason,
                peer=ctx.peer,
                instance=self.instance,
                status=status,
            )
        )
