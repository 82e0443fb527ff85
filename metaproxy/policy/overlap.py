"""What no single file shows: two files defining one tenant, or claiming the same identities."""

from __future__ import annotations

from dataclasses import dataclass

from metaproxy.policy.locate import FieldLocator, FieldPath, format_path
from metaproxy.policy.model import IdentityRule, TenantPolicy
from metaproxy.policy.problems import PolicyProblem


@dataclass(frozen=True)
class LoadedFile:
    """One file after its own checks: still compared with the others when it has problems."""

    display: str
    tenant: TenantPolicy  # possibly partial
    locator: FieldLocator
    valid: bool

    def problem(self, path: FieldPath, message: str) -> PolicyProblem:
        return PolicyProblem(self.display, self.locator.line_of(path), format_path(path), message)


def _claims_overlap(a: IdentityRule, b: IdentityRule) -> bool:
    if a.kind != b.kind or (a.issuer and b.issuer and a.issuer != b.issuer):
        return False
    if a.kind in ("platform", "aws"):
        key_a, key_b, globs_a, globs_b = a.tenant_claim, b.tenant_claim, a.apps, b.apps
    else:
        key_a, key_b = a.namespace, b.namespace
        globs_a, globs_b = a.service_accounts, b.service_accounts
    return (
        bool(key_a)
        and key_a == key_b
        and bool(set(globs_a) & set(globs_b) or "*" in globs_a or "*" in globs_b)
    )


def overlap_problems(files: list[LoadedFile]) -> list[PolicyProblem]:
    """Duplicate tenants, and identities two tenants both claim: every request from such an
    identity would be denied as ambiguous, so it is refused here rather than at request time."""
    problems: list[PolicyProblem] = []
    for later, this in enumerate(files):
        for other in files[:later]:
            if this.tenant.tenant and other.tenant.tenant == this.tenant.tenant:
                message = f"tenant {this.tenant.tenant!r} is also defined by {other.display}"
                problems.append(this.problem(("tenant",), message))
            for rule in this.tenant.identities:
                for taken in other.tenant.identities:
                    if _claims_overlap(rule, taken):
                        message = f"claims the same identities as {other.display} {taken.label}"
                        problems.append(this.problem(("identities", rule.index), message))
    return problems
