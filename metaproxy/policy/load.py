"""Load a directory of tenant policy files into a PolicySet, or refuse it with every problem.

Each file is read (`read`), checked to be complete (`complete`), parsed, checked on its own
(`check_tenant`, which uses `check_roles`, `sharing` and `fields`), then the files are checked
against each other (`overlap`: one tenant per file and per identity; `sharing`: one tenant per
role). Every problem of every file is reported at once (`problems`), and a directory with any
problem is refused as a whole: the broker keeps the set it has.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Collection
from pathlib import Path

from metaproxy.policy.check_roles import MAX_DURATION, MIN_DURATION, MIN_POLICY_DURATION
from metaproxy.policy.check_tenant import check_tenant
from metaproxy.policy.complete import END_LINE, completeness_problems
from metaproxy.policy.fields import FileChecker
from metaproxy.policy.locate import FieldLocator, format_path
from metaproxy.policy.model import PolicySet
from metaproxy.policy.names import ROLE_ARN, TENANT_NAME
from metaproxy.policy.overlap import LoadedFile, overlap_problems
from metaproxy.policy.problems import PolicyError, PolicyProblem
from metaproxy.policy.read import MAX_FILE_BYTES, PolicySnapshot, policy_files, read_policy_dir
from metaproxy.policy.sharing import ownership_problems

__all__ = [
    "END_LINE",
    "MAX_DURATION",
    "MAX_FILE_BYTES",
    "MIN_DURATION",
    "MIN_POLICY_DURATION",
    "ROLE_ARN",
    "TENANT_NAME",
    "PolicyError",
    "PolicyProblem",
    "PolicySnapshot",
    "check_policy_dir",
    "load_policy_dir",
    "policy_files",
    "read_policy_dir",
]


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


def _load_file(
    file: Path, data: bytes | str, kubernetes_issuers: Collection[str]
) -> tuple[LoadedFile | None, list[PolicyProblem]]:
    display = str(file)
    if isinstance(data, str):
        return None, [PolicyProblem(display, 0, "", data)]
    if len(data) > MAX_FILE_BYTES:
        return None, [PolicyProblem(display, 0, "", f"larger than {MAX_FILE_BYTES} bytes")]
    # First, and whatever else is wrong: a file cut short says so before the problems that
    # follow from the cut (an unterminated string, a role without its `apps`).
    incomplete = completeness_problems(display, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [*incomplete, PolicyProblem(display, 0, "", f"not UTF-8 (byte {exc.start})")]
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [*incomplete, _syntax_problem(display, text, exc)]
    check = FileChecker(display, text, kubernetes_issuers)
    tenant = check_tenant(check, parsed, file, hashlib.sha256(data).hexdigest())
    problems = [*incomplete, *sorted(check.problems, key=lambda problem: problem.line)]
    return LoadedFile(display, tenant, check.locator, valid=not problems), problems


def _load_dir(
    snapshot: PolicySnapshot, kubernetes_issuers: Collection[str]
) -> tuple[PolicySet, list[PolicyProblem]]:
    problems: list[PolicyProblem] = []
    path = snapshot.directory
    if not snapshot.exists:
        problems.append(PolicyProblem(str(path), 0, "", "policy directory does not exist"))
    elif not snapshot.files:
        problems.append(PolicyProblem(str(path), 0, "", "no *.toml policy files"))
    loaded: list[LoadedFile] = []
    for file, data in snapshot.files:
        good, file_problems = _load_file(file, data, kubernetes_issuers)
        problems.extend(file_problems)
        if good is not None:
            loaded.append(good)
    problems.extend(overlap_problems(loaded))
    problems.extend(ownership_problems(loaded))
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
