"""One tenant's policy file on its own: its identities, session templates, limits and roles."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, cast

from metaproxy.identity.spiffe import trust_domain_problem
from metaproxy.models import BrokerLimits, IdentityKind, SidecarLimits
from metaproxy.policy import sts_params
from metaproxy.policy.check_roles import check_roles
from metaproxy.policy.fields import FileChecker, type_name
from metaproxy.policy.locate import FieldPath
from metaproxy.policy.model import (
    DEFAULT_SESSION_NAME,
    DEFAULT_SOURCE_IDENTITY,
    IdentityRule,
    SessionTemplates,
    TenantPolicy,
)
from metaproxy.policy.names import NAMESPACE_NAME, TENANT_NAME
from metaproxy.policy.sharing import check_shared_roles

TOP_KEYS = {
    "tenant",
    "team",
    "description",
    "identities",
    "roles",
    "session",
    "limits",
    "shared_roles",
}
IDENTITY_KEYS = {
    "platform": {"kind", "issuer", "tenant", "apps"},
    "kubernetes": {"kind", "issuer", "namespace", "service_accounts"},
    "spiffe": {"kind", "trust_domain", "apps"},
    # The broker's --aws-attest-rules name the tenant and app an attested role maps to.
    "aws": {"kind", "issuer", "tenant", "apps"},
}
KINDS = "'platform', 'kubernetes', 'spiffe' or 'aws'"
SESSION_KEYS = {"name", "source_identity", "tags", "transitive_tag_keys"}
LIMIT_TABLES: dict[str, type[SidecarLimits] | type[BrokerLimits]] = {
    "sidecar": SidecarLimits,
    "broker": BrokerLimits,
}


def _check_identity(check: FileChecker, raw: object, index: int) -> IdentityRule | None:
    path: FieldPath = ("identities", index)
    kind = raw.get("kind") if isinstance(raw, dict) else None
    known_kind = (
        cast(IdentityKind, kind) if isinstance(kind, str) and kind in IDENTITY_KEYS else None
    )
    # With an unknown kind, still report keys that no kind accepts.
    any_kind = set().union(*IDENTITY_KEYS.values())
    entry = check.table(raw, path, IDENTITY_KEYS[known_kind] if known_kind else any_kind)
    if not isinstance(raw, dict):
        return None
    if "kind" not in entry:
        check.problem((*path, "kind"), f"missing; must be {KINDS}")
        return None
    if known_kind is None:
        check.problem((*path, "kind"), f"must be {KINDS}, not {kind!r}")
        return None
    issuer = check.string(entry, (*path, "issuer"), default="")
    if known_kind in ("platform", "aws"):
        claim = check.string(entry, (*path, "tenant"))
        if "tenant" in entry and not claim:
            check.problem((*path, "tenant"), "must not be empty")
        apps = check.globs(entry, (*path, "apps"))
        return IdentityRule(index, known_kind, issuer, tenant_claim=claim, apps=apps)
    if kind == "spiffe":
        domain = check.string(entry, (*path, "trust_domain"))
        if "trust_domain" in entry and trust_domain_problem(domain):
            check.problem((*path, "trust_domain"), f"{domain!r} {trust_domain_problem(domain)}")
        apps = check.globs(entry, (*path, "apps"))
        return IdentityRule(index, "spiffe", trust_domain=domain, apps=apps)
    namespace = check.string(entry, (*path, "namespace"))
    if "namespace" in entry and not NAMESPACE_NAME.match(namespace):
        check.problem((*path, "namespace"), f"{namespace!r} is not a Kubernetes namespace name")
    if not issuer and len(check.kubernetes_issuers) > 1:
        # A namespace is a name inside one cluster: a dev cluster's namespace `acme` got
        # production acme's role while a rule without `issuer` accepted any trusted cluster.
        check.problem(
            (*path, "issuer"),
            "missing; more than one Kubernetes issuer is trusted "
            f"({', '.join(sorted(check.kubernetes_issuers))}), so the rule must name the cluster "
            "whose namespace it means",
        )
    accounts = check.globs(entry, (*path, "service_accounts"))
    return IdentityRule(index, "kubernetes", issuer, namespace=namespace, service_accounts=accounts)


def _check_identities(check: FileChecker, raw: object) -> tuple[IdentityRule, ...]:
    if not isinstance(raw, list) or not raw:
        check.problem(("identities",), "must be one or more [[identities]] tables")
        return ()
    rules = (_check_identity(check, entry, index) for index, entry in enumerate(raw))
    return tuple(rule for rule in rules if rule)


def _check_session(check: FileChecker, raw: object) -> SessionTemplates:
    session = check.table(raw, ("session",), SESSION_KEYS)
    name = check.string(session, ("session", "name"), DEFAULT_SESSION_NAME)
    check.name_template(name, ("session", "name"), "session name")
    if "${task}" not in name:
        # One session name for every task would make CloudTrail unable to tell tasks apart.
        check.problem(("session", "name"), "must contain ${task} so each task is attributable")
    source = check.string(session, ("session", "source_identity"), DEFAULT_SOURCE_IDENTITY)
    check.name_template(source, ("session", "source_identity"), "source identity")
    tags = check.table(session.get("tags", {}), ("session", "tags"))
    if len(tags) > sts_params.MAX_TAGS:
        check.problem(("session", "tags"), f"at most {sts_params.MAX_TAGS} session tags")
    lowered: dict[str, str] = {}
    for key, value in tags.items():
        path: FieldPath = ("session", "tags", key)
        if reason := sts_params.tag_key_problem(key):
            check.problem(path, reason)
        if key.lower() in lowered:
            check.problem(path, f"repeats tag {lowered[key.lower()]!r}; AWS ignores key case")
        lowered.setdefault(key.lower(), key)
        if not isinstance(value, str):
            check.problem(path, f"must be a string template, not {type_name(value)}")
        else:
            check.template(value, path)
    transitive = session.get("transitive_tag_keys", [])
    path = ("session", "transitive_tag_keys")
    if not isinstance(transitive, list) or not all(isinstance(k, str) for k in transitive):
        check.problem(path, "must be an array of tag key strings")
        transitive = []
    for index, key in enumerate(transitive):
        if key not in tags:
            check.problem((*path, index), f"{key!r} is not a key of session.tags")
    string_tags = tuple((k, v) for k, v in tags.items() if isinstance(v, str))
    return SessionTemplates(name, source, string_tags, tuple(transitive))


def _check_limits(check: FileChecker, raw: object, which: str) -> Any:
    cls = LIMIT_TABLES[which]
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    table = check.table(raw, ("limits", which), set(fields))
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            continue
        path: FieldPath = ("limits", which, key)
        wants_int = fields[key] in (int, "int")
        number_ok = isinstance(value, int) or (isinstance(value, float) and not wants_int)
        if isinstance(value, bool) or not number_ok:
            wanted = "an integer" if wants_int else "a number"
            check.problem(path, f"must be {wanted}, not {type_name(value)}")
        elif not math.isfinite(value) or value <= 0:
            check.problem(path, f"must be a positive finite number, not {value}")
        else:
            values[key] = value if wants_int else float(value)
    return cls(**values)


def check_tenant(check: FileChecker, data: dict[str, Any], file: Path, digest: str) -> TenantPolicy:
    """The tenant `data` describes (partial when `check` found problems)."""
    check.table(data, (), TOP_KEYS)
    tenant = check.string(data, ("tenant",))
    if "tenant" in data and not TENANT_NAME.match(tenant):
        check.problem(("tenant",), f"{tenant!r} must be 1-64 of A-Z a-z 0-9 _.- (leading alnum)")
    elif tenant and tenant != file.stem:
        check.problem(("tenant",), f"{tenant!r} must equal the file name stem {file.stem!r}")
    team = check.string(data, ("team",))
    if "team" in data and isinstance(data["team"], str) and not team.strip():
        check.problem(("team",), "must not be empty")
    limits = check.table(data.get("limits", {}), ("limits",), set(LIMIT_TABLES))
    roles = check_roles(check, data.get("roles"))
    session = _check_session(check, data.get("session", {}))
    return TenantPolicy(
        tenant=tenant,
        team=team,
        file=file.name,
        digest=digest,
        identities=_check_identities(check, data.get("identities")),
        roles=roles,
        session=session,
        sidecar_limits=_check_limits(check, limits.get("sidecar", {}), "sidecar"),
        broker_limits=_check_limits(check, limits.get("broker", {}), "broker"),
        description=check.string(data, ("description",), default=""),
        shared_roles=check_shared_roles(
            check, data.get("shared_roles", {}), tenant, roles, session
        ),
    )
