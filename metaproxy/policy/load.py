"""Read and validate a directory of tenant policy files, reporting every problem at once.

A policy file is operator input like any other: an API once crashed, failed over and crashed
again on a `null` nobody validated. So nothing is assumed: each field's type, range and template
is checked, and every problem is reported with its file, line and field, all files at once, so an
operator fixes a directory in one pass instead of one error per reload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaproxy.errors import ConfigError
from metaproxy.models import BrokerLimits, SidecarLimits
from metaproxy.policy import sts_params
from metaproxy.policy.locate import FieldLocator, FieldPath, format_path
from metaproxy.policy.model import (
    DEFAULT_SESSION_NAME,
    DEFAULT_SOURCE_IDENTITY,
    IdentityRule,
    PolicySet,
    RoleRule,
    SessionTemplates,
    TenantPolicy,
)

MAX_FILE_BYTES = 1 << 20
MIN_DURATION, MAX_DURATION = 900, 43_200  # STS's bounds for DurationSeconds
# Our floor: the broker hands out cached credentials until half their life is gone and sidecars
# never serve credentials with less than 15 minutes left, so a role needs 2 × 15 minutes or SDKs
# are served credentials about to expire (896 s and 849 s left were seen) while all is healthy.
MIN_POLICY_DURATION = 1800
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1123 label
# arn:PARTITION:iam::ACCOUNT:role/PATH/NAME; path segments are printable ASCII except `/`.
ROLE_ARN = re.compile(
    r"^arn:aws[-a-z]*:iam::\d{12}:role/(?:[!-.0-~]{1,512}/)*[\w+=,.@-]{1,64}$", re.ASCII
)
_SAMPLE_VALUE = "sample-value"  # rendered into templates at load time to try them out

TOP_KEYS = {"tenant", "team", "description", "identities", "roles", "session", "limits"}
IDENTITY_KEYS = {
    "platform": {"kind", "issuer", "tenant", "apps"},
    "kubernetes": {"kind", "issuer", "namespace", "service_accounts"},
}
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
SESSION_KEYS = {"name", "source_identity", "tags", "transitive_tag_keys"}
LIMIT_TABLES: dict[str, type[SidecarLimits] | type[BrokerLimits]] = {
    "sidecar": SidecarLimits,
    "broker": BrokerLimits,
}


@dataclass(frozen=True)
class PolicyProblem:
    file: str
    line: int  # 1-based; 0 when unknown
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class PolicyError(ConfigError):
    """A policy directory that must not be used; `problems` lists everything wrong with it."""

    public_message = "invalid policy"

    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


class _FileChecker:
    """Validates one parsed file; collects problems instead of stopping at the first."""

    def __init__(self, display: str, text: str, kubernetes_issuers: Collection[str] = ()) -> None:
        self.display = display
        self.locator = FieldLocator(text)
        self.problems: list[PolicyProblem] = []
        self.kubernetes_issuers = kubernetes_issuers

    def problem(self, path: FieldPath, message: str) -> None:
        line = self.locator.line_of(path)
        self.problems.append(PolicyProblem(self.display, line, format_path(path), message))

    def table(
        self, value: object, path: FieldPath, allowed: set[str] | None = None
    ) -> dict[str, Any]:
        """`value` as a table, reporting keys outside `allowed` (None: any key)."""
        if not isinstance(value, dict):
            self.problem(path, f"must be a table, not {_type_name(value)}")
            return {}
        if allowed is not None:
            expected = ", ".join(sorted(allowed))
            for key in sorted(set(value) - allowed):
                self.problem((*path, key), f"unknown key; expected one of {expected}")
        return value

    def string(self, table: dict[str, Any], path: FieldPath, default: str | None = None) -> str:
        key = str(path[-1])
        if key not in table:
            if default is None:
                self.problem(path, "missing; this field is required")
            return default or ""
        value = table[key]
        if not isinstance(value, str):
            self.problem(path, f"must be a string, not {_type_name(value)}")
            return default or ""
        return value

    def globs(self, table: dict[str, Any], path: FieldPath, required: str = "") -> tuple[str, ...]:
        """The glob array at `path`; absent, `["*"]`, unless `required` says why it must be
        written out (then a problem, and no globs: the rule matches nothing)."""
        if required and str(path[-1]) not in table:
            self.problem(path, f"missing; {required}")
            return ()
        value = table.get(str(path[-1]), ["*"])
        if not isinstance(value, list) or not value:
            self.problem(path, "must be a non-empty array of glob strings")
            return ()
        for index, glob in enumerate(value):
            if not isinstance(glob, str) or not glob:
                self.problem((*path, index), f"must be a non-empty string, not {glob!r}")
        return tuple(glob for glob in value if isinstance(glob, str))

    def template(self, template: str, path: FieldPath) -> bool:
        """True if `template` names only known variables and every `${` is closed."""
        ok = True
        for name in sts_params.template_variables(template):
            if name not in sts_params.VARIABLES:
                self.problem(path, f"unknown variable ${{{name}}}; use {_variables_help()}")
                ok = False
        if "${" in sts_params.literal_text(template):
            self.problem(path, "unterminated ${ in template")
            ok = False
        return ok

    def name_template(self, template: str, path: FieldPath, what: str) -> None:
        """Refuse RoleSessionName/SourceIdentity templates that can never give a usable name."""
        if not self.template(template, path):
            return
        literal = sts_params.literal_text(template)
        if not template.strip():
            self.problem(path, f"empty template can never produce a valid {what}")
        bad = sorted({ch for ch in literal if ch not in sts_params.NAME_CHARS})
        if bad:
            self.problem(
                path,
                f"{what} can never contain {''.join(bad)!r}; STS accepts only A-Z a-z 0-9 _+=,.@-",
            )
        if len(literal) > sts_params.NAME_MAX - 2:
            self.problem(path, f"fixed text leaves no room in a {sts_params.NAME_MAX}-char {what}")


def _variables_help() -> str:
    return ", ".join(f"${{{name}}}" for name in sts_params.VARIABLES)


def _check_identity(check: _FileChecker, raw: object, index: int) -> IdentityRule | None:
    path: FieldPath = ("identities", index)
    kind = raw.get("kind") if isinstance(raw, dict) else None
    known_kind = kind if isinstance(kind, str) and kind in IDENTITY_KEYS else None
    # With an unknown kind, still report keys that no kind accepts.
    any_kind = IDENTITY_KEYS["platform"] | IDENTITY_KEYS["kubernetes"]
    entry = check.table(raw, path, IDENTITY_KEYS[known_kind] if known_kind else any_kind)
    if not isinstance(raw, dict):
        return None
    if "kind" not in entry:
        check.problem((*path, "kind"), "missing; must be 'platform' or 'kubernetes'")
        return None
    if known_kind is None:
        check.problem((*path, "kind"), f"must be 'platform' or 'kubernetes', not {kind!r}")
        return None
    issuer = check.string(entry, (*path, "issuer"), default="")
    if kind == "platform":
        claim = check.string(entry, (*path, "tenant"))
        if "tenant" in entry and not claim:
            check.problem((*path, "tenant"), "must not be empty")
        apps = check.globs(entry, (*path, "apps"))
        return IdentityRule(index, "platform", issuer, tenant_claim=claim, apps=apps)
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


def _check_session_policy(check: _FileChecker, template: str, path: FieldPath) -> None:
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


def _check_role(check: _FileChecker, raw: object, index: int) -> RoleRule | None:
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
        check.problem((*path, "default"), f"must be true or false, not {_type_name(default)}")
    duration = entry.get("duration_seconds", 3600)
    if not isinstance(duration, int) or isinstance(duration, bool):
        check.problem(
            (*path, "duration_seconds"), f"must be an integer, not {_type_name(duration)}"
        )
        duration = 3600
    elif not MIN_DURATION <= duration <= MAX_DURATION:
        check.problem(
            (*path, "duration_seconds"), f"{duration} is outside {MIN_DURATION}..{MAX_DURATION}"
        )
    elif duration < MIN_POLICY_DURATION:
        check.problem(
            (*path, "duration_seconds"),
            f"{duration} is under {MIN_POLICY_DURATION}: credentials are refreshed at half-life "
            "and never served with less than 15 minutes left, so a shorter role leaves SDKs "
            "with credentials about to expire",
        )
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
    check: _FileChecker, entry: dict[str, Any], path: FieldPath, duration: int
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
    tags_on = entry.get("session_tags", True)
    if not isinstance(tags_on, bool):
        check.problem((*path, "session_tags"), f"must be true or false, not {_type_name(tags_on)}")
        tags_on = True
    return via, external_id, tags_on


def _check_roles(check: _FileChecker, raw: object) -> tuple[RoleRule, ...]:
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


def _check_session(check: _FileChecker, raw: object) -> SessionTemplates:
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
            check.problem(path, f"must be a string template, not {_type_name(value)}")
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


def _check_limits(check: _FileChecker, raw: object, which: str) -> Any:
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
            check.problem(path, f"must be {wanted}, not {_type_name(value)}")
        elif not math.isfinite(value) or value <= 0:
            check.problem(path, f"must be a positive finite number, not {value}")
        else:
            values[key] = value if wants_int else float(value)
    return cls(**values)


def _check_identities(check: _FileChecker, raw: object) -> tuple[IdentityRule, ...]:
    if not isinstance(raw, list) or not raw:
        check.problem(("identities",), "must be one or more [[identities]] tables")
        return ()
    rules = (_check_identity(check, entry, index) for index, entry in enumerate(raw))
    return tuple(rule for rule in rules if rule)


def _check_tenant(
    check: _FileChecker, data: dict[str, Any], file: Path, digest: str
) -> TenantPolicy:
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
    return TenantPolicy(
        tenant=tenant,
        team=team,
        file=file.name,
        digest=digest,
        identities=_check_identities(check, data.get("identities")),
        roles=_check_roles(check, data.get("roles")),
        session=_check_session(check, data.get("session", {})),
        sidecar_limits=_check_limits(check, limits.get("sidecar", {}), "sidecar"),
        broker_limits=_check_limits(check, limits.get("broker", {}), "broker"),
        description=check.string(data, ("description",), default=""),
    )


def _syntax_problem(display: str, text: str, exc: tomllib.TOMLDecodeError) -> PolicyProblem:
    # tomllib only says "(at line N, column M)"; the field is whatever key that line sets, so
    # `name = null` under [session] reports `session.name`.
    found = re.search(r"at line (\d+), column \d+", str(exc))
    line = int(found.group(1)) if found else 0
    field = format_path(FieldLocator(text).field_at(line)) if line else ""
    message = str(exc).split(" (at ")[0]
    if re.search(r"=\s*(null|nil|None)\s*(#.*)?$", text.splitlines()[line - 1] if line else ""):
        message += "; TOML has no null: give a value or leave the key out"
    return PolicyProblem(display, line, field, f"TOML syntax error: {message}")


@dataclass(frozen=True)
class _LoadedFile:
    display: str
    tenant: TenantPolicy  # possibly partial: still compared with other files for overlaps
    locator: FieldLocator
    valid: bool

    def problem(self, path: FieldPath, message: str) -> PolicyProblem:
        return PolicyProblem(self.display, self.locator.line_of(path), format_path(path), message)


@dataclass(frozen=True)
class PolicySnapshot:
    """What a policy directory held at one read: each file's bytes, or why it could not be read.

    Loading works on a snapshot, never on files read one by one while they change: the store
    reads twice, a moment apart, and loads only when both reads match (`PolicyStore.watch`)."""

    directory: Path
    exists: bool
    files: tuple[tuple[Path, bytes | str], ...]  # str: the read error


def read_policy_dir(path: Path) -> PolicySnapshot:
    """Every policy file's bytes (a file past MAX_FILE_BYTES is read one byte past it, no more)."""
    if not path.is_dir():
        return PolicySnapshot(path, False, ())
    files: list[tuple[Path, bytes | str]] = []
    for file in policy_files(path):
        try:
            with file.open("rb") as handle:
                files.append((file, handle.read(MAX_FILE_BYTES + 1)))
        except OSError as exc:
            files.append((file, f"cannot read: {exc.strerror}"))
    return PolicySnapshot(path, True, tuple(files))


def _load_file(
    file: Path, data: bytes | str, kubernetes_issuers: Collection[str]
) -> tuple[_LoadedFile | None, list[PolicyProblem]]:
    display = str(file)
    if isinstance(data, str):
        return None, [PolicyProblem(display, 0, "", data)]
    if len(data) > MAX_FILE_BYTES:
        return None, [PolicyProblem(display, 0, "", f"larger than {MAX_FILE_BYTES} bytes")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [PolicyProblem(display, 0, "", f"not UTF-8 (byte {exc.start})")]
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_problem(display, text, exc)]
    check = _FileChecker(display, text, kubernetes_issuers)
    tenant = _check_tenant(check, parsed, file, hashlib.sha256(data).hexdigest())
    problems = sorted(check.problems, key=lambda problem: problem.line)
    return _LoadedFile(display, tenant, check.locator, valid=not problems), problems


def _claims_overlap(a: IdentityRule, b: IdentityRule) -> bool:
    if a.kind != b.kind or (a.issuer and b.issuer and a.issuer != b.issuer):
        return False
    if a.kind == "platform":
        key_a, key_b, globs_a, globs_b = a.tenant_claim, b.tenant_claim, a.apps, b.apps
    else:
        key_a, key_b = a.namespace, b.namespace
        globs_a, globs_b = a.service_accounts, b.service_accounts
    return (
        bool(key_a)
        and key_a == key_b
        and bool(set(globs_a) & set(globs_b) or "*" in globs_a or "*" in globs_b)
    )


def _cross_file_problems(files: list[_LoadedFile]) -> list[PolicyProblem]:
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


def policy_files(path: Path) -> list[Path]:
    """The policy files of a directory, in load order."""
    # Dot files are editor droppings (emacs `.#acme.toml` lock links), never policies.
    return sorted(
        file for file in path.glob("*.toml") if file.is_file() and not file.name.startswith(".")
    )


def _load_dir(
    snapshot: PolicySnapshot, kubernetes_issuers: Collection[str]
) -> tuple[PolicySet, list[PolicyProblem]]:
    problems: list[PolicyProblem] = []
    path = snapshot.directory
    if not snapshot.exists:
        problems.append(PolicyProblem(str(path), 0, "", "policy directory does not exist"))
    elif not snapshot.files:
        problems.append(PolicyProblem(str(path), 0, "", "no *.toml policy files"))
    loaded: list[_LoadedFile] = []
    for file, data in snapshot.files:
        good, file_problems = _load_file(file, data, kubernetes_issuers)
        problems.extend(file_problems)
        if good is not None:
            loaded.append(good)
    problems.extend(_cross_file_problems(loaded))
    digest = hashlib.sha256()
    valid = [good.tenant for good in loaded if good.valid]
    for tenant in valid:
        digest.update(f"{tenant.file}\0{tenant.digest}\0".encode())
    tenants = {tenant.tenant: tenant for tenant in valid}
    return PolicySet(tenants, digest.hexdigest()), problems


def load_policy_dir(
    path: Path,
    *,
    kubernetes_issuers: Collection[str] = (),
    snapshot: PolicySnapshot | None = None,
) -> PolicySet:
    """Every tenant in `path` (as read in `snapshot`, if given); raises PolicyError listing every
    problem in every file. `kubernetes_issuers` are the trusted Kubernetes token issuers: with
    more than one, every Kubernetes identity rule must name its own."""
    policy_set, problems = _load_dir(snapshot or read_policy_dir(path), kubernetes_issuers)
    if problems:
        raise PolicyError(problems)
    return policy_set


def check_policy_dir(
    path: Path, *, kubernetes_issuers: Collection[str] = ()
) -> list[PolicyProblem]:
    """Every problem in `path`; an empty list means `load_policy_dir` would succeed."""
    return _load_dir(read_policy_dir(path), kubernetes_issuers)[1]
