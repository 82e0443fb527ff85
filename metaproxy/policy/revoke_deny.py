"""The IAM deny that ends sessions issued before a revocation, matched the way sessions are tagged.

Temporary credentials cannot be recalled, so a revocation also prints an inline role policy
denying everything to the revoked task's (or tenant's) sessions issued before the revocation
(`aws:TokenIssueTime`). The condition must match what STS recorded on those sessions, which is
what the broker sent: tag values after `tag_value`'s repair (`batch#42` became `batch-42`), a
SourceIdentity or session name after theirs. So the values here come from the same tenant
templates and the same repair functions as `sts_params.build_spec`, never from the raw name.

Only templates whose variables are all known from (tenant, task) can be rendered: a tag
`task = "${task}"` can, `app = "${app}"` cannot. In order of preference: a session tag, the
SourceIdentity, the session name (`aws:userid` ends in `:<session name>` for assumed roles).
"""

from __future__ import annotations

from typing import Any

from metaproxy.policy.model import TenantPolicy
from metaproxy.policy.sts_params import (
    render,
    session_name,
    source_identity,
    tag_value,
    template_variables,
)


def _renderable(template: str, known: dict[str, str], needs: str) -> bool:
    names = set(template_variables(template))
    return needs in names and names <= set(known)


def deny_condition(tenant: TenantPolicy, task: str) -> tuple[str, str, str] | None:
    """(operator, condition key, value) that picks out the sessions, or None if none can."""
    known = {"tenant": tenant.tenant, "team": tenant.team}
    needs = "tenant"
    if task:
        known["task"] = task
        needs = "task"
    for key, template in tenant.session.tags:
        if _renderable(template, known, needs):
            return ("StringEquals", f"aws:PrincipalTag/{key}", tag_value(render(template, known)))
    session = tenant.session
    if _renderable(session.source_identity, known, needs):
        value = source_identity(render(session.source_identity, known))
        return ("StringEquals", "aws:SourceIdentity", value)
    if _renderable(session.name, known, needs):
        # Session names hold no * or ? (their charset has neither), so the pattern is exact.
        return ("StringLike", "aws:userid", "*:" + session_name(render(session.name, known)))
    return None


def deny_policy(tenant: TenantPolicy, task: str, revoked_at: str) -> dict[str, Any] | None:
    """An IAM policy denying everything to the sessions of `task` (or of the whole tenant, when
    task is "") that STS issued before `revoked_at`.

    None when no template tells this task's sessions apart: a deny without that condition
    would end every task's sessions of the role, so the operator is told instead."""
    condition: dict[str, Any] = {"DateLessThan": {"aws:TokenIssueTime": revoked_at}}
    match = deny_condition(tenant, task)
    if match is None and task:
        return None
    if match is not None:
        operator, key, value = match
        condition[operator] = {key: value}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "MetaproxyRevokeTask" if task else "MetaproxyRevokeTenant",
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": condition,
            }
        ],
    }
