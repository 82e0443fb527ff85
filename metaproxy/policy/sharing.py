"""A role belongs to one tenant, unless every tenant naming it says it is shared.

Two tenants' files once named the same role, and the second tenant was served the first's
cached credentials (session `acme.…`). Nothing but the policy stands between a tenant and a
role: the broker's own IAM identity may assume every tenant's role. So a role ARN, as a
role's `arn` or as its `via` hub, may appear in one tenant's file only, unless each file that
names it lists the others under `[shared_roles]`:

    [shared_roles]
    "arn:aws:iam::111111111111:role/metaproxy-hub" = ["globex"]   # or ["*"]: any tenant

Both sides must say so, so no file can take another tenant's role on its own say-so. Roles are
compared as IAM tells them apart, by partition, account and name (whatever the path or case).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from metaproxy.policy.fields import FileChecker, type_name
from metaproxy.policy.locate import FieldPath
from metaproxy.policy.model import RoleRule, SessionTemplates, role_identity
from metaproxy.policy.names import ROLE_ARN, TENANT_NAME
from metaproxy.policy.overlap import LoadedFile
from metaproxy.policy.problems import PolicyProblem

SharedRoles = tuple[tuple[str, tuple[str, ...]], ...]


def _named(role: RoleRule) -> list[tuple[str, str]]:
    """(field, ARN) of each role ARN a role entry names: the role, and its hub if chained."""
    return [(key, arn) for key, arn in (("arn", role.arn), ("via", role.via)) if arn]


def check_shared_roles(
    check: FileChecker,
    raw: object,
    tenant: str,
    roles: tuple[RoleRule, ...],
    session: SessionTemplates,
) -> SharedRoles:
    """The `[shared_roles]` table of one file: each key a role ARN this file names, each value
    the tenants that may name it too."""
    table = check.table(raw, ("shared_roles",))
    own = {role_identity(arn) for role in roles for _, arn in _named(role)}
    shared: list[tuple[str, tuple[str, ...]]] = []
    for arn, value in table.items():
        path: FieldPath = ("shared_roles", arn)
        if not ROLE_ARN.match(arn):
            check.problem(path, f"{arn!r} is not an IAM role ARN")
            continue
        if role_identity(arn) not in own:
            check.problem(path, "no role of this file names it (as `arn` or `via`)")
        tenants = _tenants(check, value, path, tenant)
        if tenants:
            shared.append((arn, tenants))
    if shared and "${tenant}" not in session.name:
        check.problem(
            ("session", "name"),
            "must contain ${tenant}: this tenant shares roles ([shared_roles]), and CloudTrail "
            "of a shared role must tell the tenants' sessions apart",
        )
    return tuple(shared)


def _tenants(check: FileChecker, value: Any, path: FieldPath, tenant: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        check.problem(path, f'must be an array of tenant names (or "*"), not {type_name(value)}')
        return ()
    if not value:
        check.problem(path, 'must name at least one tenant (or "*")')
    tenants: list[str] = []
    for index, name in enumerate(value):
        if not isinstance(name, str):
            check.problem((*path, index), f"must be a tenant name, not {type_name(name)}")
        elif name != "*" and not TENANT_NAME.match(name):
            check.problem((*path, index), f'{name!r} is not a tenant name or "*"')
        elif name == tenant:
            check.problem((*path, index), "names this file's own tenant")
        else:
            tenants.append(name)
    return tuple(tenants)


class _Naming(NamedTuple):
    """One place a file names a role ARN: `roles[i].arn` or `roles[i].via`."""

    file: LoadedFile
    role: RoleRule
    key: str
    arn: str

    @property
    def tenant(self) -> str:
        return self.file.tenant.tenant

    @property
    def label(self) -> str:
        return f"{self.file.display} {self.role.label}.{self.key}"


def ownership_problems(files: list[LoadedFile]) -> list[PolicyProblem]:
    """Each place a role ARN is named by a tenant after another tenant named it (in load
    order) without both sharing it with each other."""
    first: dict[tuple[str, str, str], dict[str, _Naming]] = {}
    problems: list[PolicyProblem] = []
    for file in files:
        if not file.tenant.tenant:
            continue
        for role in file.tenant.roles:
            for key, arn in _named(role):
                this = _Naming(file, role, key, arn)
                owners = first.setdefault(role_identity(arn), {})
                for other in owners.values():
                    # Two files of one tenant are reported as such (`overlap`).
                    if other.tenant != this.tenant and (problem := _unshared(this, other)):
                        problems.append(problem)
                owners.setdefault(this.tenant, this)
    return problems


def _unshared(this: _Naming, other: _Naming) -> PolicyProblem | None:
    # Tenant names are checked to be plain (names.TENANT_NAME), so they are written unquoted.
    missing = []
    if not other.file.tenant.shares(this.arn, this.tenant):
        missing.append(f"{other.file.display} does not share it with {this.tenant}")
    if not this.file.tenant.shares(this.arn, other.tenant):
        missing.append(f"this file does not share it with {other.tenant}")
    if not missing:
        return None
    return this.file.problem(
        ("roles", this.role.index, this.key),
        f"{this.arn} belongs to tenant {other.tenant} ({other.label}); a role belongs to one "
        f"tenant unless each file naming it lists the other under [shared_roles], and "
        f"{' and '.join(missing)}",
    )
