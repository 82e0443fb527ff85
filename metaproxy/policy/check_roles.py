"""The `[[roles]]` of one policy file: which roles a tenant's tasks may get, and how each is
reached (directly, or by role chaining through `via` with an ExternalId)."""

from __future__ import annotations

import json
from typing import Any

from metaproxy.policy import sts_params
from metaproxy.policy.fields import FileChecker, type_name
from metaproxy.policy.locate import FieldPath
from metaproxy.policy.model import RoleRule
from metaproxy.policy.names import ROLE_ARN

MIN_DURATION, MAX_DURATION = 900, 43_200  # STS's bounds for DurationSeconds
# Our floor: the broker hands out cached credentials until half their life is gone and sidecars
# never serve credentials with less than 15 minutes left, so a role needs 2 × 15 minutes or SDKs
# are served credentials about to expire (896 s and 849 s left were seen) while all is healthy.
MIN_POLICY_DURATION = 1800
ROLE_KEYS = {
    "arn",
    "default",
    "apps",
    "duration_seconds",
    "session_policy",
    "via",
    "external_id",
    "session_tags",
}
_SAMPLE_VALUE = "sample-value"  # rendered into templates at load time to try them out


def _check_session_policy(check: FileChecker, template: str, path: FieldPath) -> None:
    if not check.template(template, path):
        return
    empty = dict.fromkeys(sts_params.VARIABLES, "")
    try:
        sts_params.session_policy(template, dict.fromkeys(sts_params.VARIABLES, _SAMPLE_VALUE))
        sts_params.session_policy(template, empty)
    except sts_params.SessionPolicyTooLong:
        check.problem(path, f"longer than {sts_params.MAX_SESSION_POLICY} characters")
        return
    except sts_params.SessionPolicyError as exc:
        check.problem(path, f"{exc} (variables belong inside JSON strings)")
        return
    if not isinstance(json.loads(sts_params.session_policy(template, empty)), dict):
        check.problem(path, "must be a JSON object (an IAM policy document)")


def _check_duration(check: FileChecker, entry: dict[str, Any], path: FieldPath) -> int:
    duration = entry.get("duration_seconds", 3600)
    where = (*path, "duration_seconds")
    if not isinstance(duration, int) or isinstance(duration, bool):
        check.problem(where, f"must be an integer, not {type_name(duration)}")
        return 3600
    if not MIN_DURATION <= duration <= MAX_DURATION:
        check.problem(where, f"{duration} is outside {MIN_DURATION}..{MAX_DURATION}")
    elif duration < MIN_POLICY_DURATION:
        check.problem(
            where,
            f"{duration} is under {MIN_POLICY_DURATION}: credentials are refreshed at half-life "
            "and never served with less than 15 minutes left, so a shorter role leaves SDKs "
            "with credentials about to expire",
        )
    return duration


def _check_role(check: FileChecker, raw: object, index: int) -> RoleRule | None:
    path: FieldPath = ("roles", index)
    entry = check.table(raw, path, ROLE_KEYS)
    if not isinstance(raw, dict):
        return None
    arn = check.string(entry, (*path, "arn"))
    if "arn" in entry and isinstance(entry["arn"], str) and not ROLE_ARN.match(arn):
        check.problem(
            (*path, "arn"),
            f"{arn!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/[path/]name)",
        )
    default = entry.get("default", False)
    if not isinstance(default, bool):
        check.problem((*path, "default"), f"must be true or false, not {type_name(default)}")
    duration = _check_duration(check, entry, path)
    policy = None
    if "session_policy" in entry:
        policy = check.string(entry, (*path, "session_policy"))
        _check_session_policy(check, policy, (*path, "session_policy"))
    # Explicit: a role table cut off mid-write (or an edit that forgot the line) must not hand
    # the role to every app of the tenant, as a `web` task once got `acme-reports`.
    apps = check.globs(entry, (*path, "apps"), required='list the apps that may get it ("*": all)')
    via, external_id, tags_on = _check_chain(check, entry, path, duration)
    return RoleRule(index, arn, default is True, apps, duration, policy, via, external_id, tags_on)


def _check_chain(
    check: FileChecker, entry: dict[str, Any], path: FieldPath, duration: int
) -> tuple[str | None, str | None, bool]:
    """`via`, `external_id` and `session_tags` of a role: how it is reached."""
    via = None
    if "via" in entry:
        via = check.string(entry, (*path, "via"))
        if isinstance(entry["via"], str) and not ROLE_ARN.match(via):
            check.problem((*path, "via"), f"{via!r} is not an IAM role ARN to assume first")
        elif duration > sts_params.CHAINED_MAX_SECONDS:
            check.problem(
                (*path, "duration_seconds"),
                f"{duration} is over {sts_params.CHAINED_MAX_SECONDS}: the role is reached by "
                f"role chaining (via), and AWS caps chained sessions at one hour",
            )
    external_id = None
    if "external_id" in entry:
        external_id = check.string(entry, (*path, "external_id"))
        if check.template(external_id, (*path, "external_id")):
            literal = sts_params.literal_text(external_id)
            bad = sorted({ch for ch in literal if ch not in sts_params.EXTERNAL_ID_CHARS})
            if bad:
                check.problem(
                    (*path, "external_id"),
                    f"an ExternalId can never contain {''.join(bad)!r}; "
                    "STS accepts only A-Z a-z 0-9 _+=,.@:/-",
                )
            if not external_id.strip():
                check.problem((*path, "external_id"), "must not be empty")
            elif "${tenant}" not in external_id:
                # A role's account checks the ExternalId to know on whose behalf it is
                # assumed; a fixed one is anyone's to present, and would name no tenant.
                check.problem(
                    (*path, "external_id"),
                    "must contain ${tenant}, so the ExternalId the role's account checks is "
                    "this tenant's alone",
                )
    tags_on = entry.get("session_tags", True)
    if not isinstance(tags_on, bool):
        check.problem((*path, "session_tags"), f"must be true or false, not {type_name(tags_on)}")
        tags_on = True
    return via, external_id, tags_on


def check_roles(check: FileChecker, raw: object) -> tuple[RoleRule, ...]:
    if not isinstance(raw, list) or not raw:
        check.problem(("roles",), "must be one or more [[roles]] tables")
        return ()
    roles = [role for index, entry in enumerate(raw) if (role := _check_role(check, entry, index))]
    defaults = [role for role in roles if role.default]
    if len(defaults) != 1:
        where = ("roles", defaults[1].index, "default") if defaults else ("roles",)
        check.problem(where, f"exactly one role must have default = true, found {len(defaults)}")
    seen: dict[str, int] = {}
    for role in roles:
        if role.name in seen:
            check.problem(
                ("roles", role.index, "arn"),
                f"role name {role.name!r} repeats roles[{seen[role.name]}]; names must be unique",
            )
        seen.setdefault(role.name, role.index)
    return tuple(roles)
