"""Decide which role a verified identity gets, as a value that explains itself.

Pure: no I/O, no clock, no logging. The `rule` and `reason` of a Decision are for logs and the
audit log; the client only ever learns that it was denied.
"""

from __future__ import annotations

from metaproxy.models import Decision, Identity
from metaproxy.policy.model import PolicySet, RoleRule, TenantPolicy
from metaproxy.policy.sts_params import SessionPolicyError, build_spec


def _describe(identity: Identity) -> str:
    if identity.kind == "kubernetes":
        return (
            f"kubernetes identity {identity.namespace}/{identity.service_account} "
            f"from {identity.issuer!r}"
        )
    if identity.kind == "spiffe":
        return f"spiffe identity {identity.subject!r} (app {identity.app!r})"
    claims = f"tenant={identity.tenant!r} app={identity.app!r}"
    if identity.kind == "aws":
        return f"aws identity {identity.subject} ({claims})"
    return f"platform identity {claims} from {identity.issuer!r}"


def _app(identity: Identity) -> str:
    # Kubernetes tokens carry no app claim: the service account is the app.
    return identity.service_account if identity.kind == "kubernetes" else identity.app


def tenant_for(policies: PolicySet, identity: Identity) -> TenantPolicy | None:
    """The one tenant whose identity rules match, or None (no tenant, or more than one)."""
    claiming = policies.claiming(identity)
    return claiming[0] if len(claiming) == 1 else None


def _deny(
    policies: PolicySet,
    rule: str,
    reason: str,
    tenant: TenantPolicy | None = None,
    role: RoleRule | None = None,
) -> Decision:
    if tenant is None:
        return Decision(False, "", "", rule, reason, policies.digest)
    return Decision(
        allowed=False,
        tenant=tenant.tenant,
        team=tenant.team,
        rule=rule,
        reason=reason,
        policy_digest=policies.digest,
        role_name=role.name if role else "",
        role_arn=role.arn if role else "",
        sidecar_limits=tenant.sidecar_limits,
        broker_limits=tenant.broker_limits,
    )


def evaluate(policies: PolicySet, identity: Identity, requested_role: str | None) -> Decision:
    """The role `identity` gets, by name or ARN (None or "" asks for the tenant's default)."""
    claiming = policies.claiming(identity)
    if not claiming:
        return _deny(policies, "no-tenant", f"no tenant's identities match {_describe(identity)}")
    if len(claiming) > 1:
        files = ", ".join(sorted(tenant.file for tenant in claiming))
        reason = f"{_describe(identity)} matches several tenants ({files})"
        return _deny(policies, "ambiguous-tenant", reason)
    tenant = claiming[0]
    if requested_role:
        role = tenant.find_role(requested_role)
        if role is None:
            reason = f"role {requested_role!r} is not in {tenant.file}"
            return _deny(policies, "role-not-allowed", reason, tenant)
    else:
        role = tenant.default_role
    rule = f"{tenant.file} {role.label}"
    app = _app(identity)
    if not role.allows_app(app):
        reason = f"{rule}: app {app!r} is not in {list(role.apps)} for role {role.name!r}"
        return _deny(policies, "app-not-allowed", reason, tenant, role)
    try:
        spec = build_spec(tenant, role, identity)
    except SessionPolicyError as exc:
        return _deny(policies, exc.rule, f"{rule}: {exc}", tenant, role)
    how = "requested" if requested_role else "default"
    return Decision(
        allowed=True,
        tenant=tenant.tenant,
        team=tenant.team,
        rule=rule,
        reason=f"{_describe(identity)} is tenant {tenant.tenant!r}; {how} role {role.name!r}",
        policy_digest=policies.digest,
        role_name=role.name,
        role_arn=role.arn,
        spec=spec,
        sidecar_limits=tenant.sidecar_limits,
        broker_limits=tenant.broker_limits,
    )
