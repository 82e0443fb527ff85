"""Loading policy directories: every problem reported with file, line and field."""

from __future__ import annotations

import datetime
import json
import math
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.errors import ConfigError
from metaproxy.models import BrokerLimits, SidecarLimits
from metaproxy.policy.load import (
    END_LINE,
    PolicyError,
    PolicyProblem,
    check_policy_dir,
    load_policy_dir,
)
from metaproxy.policy.locate import FieldLocator, format_path

SHIPPED = Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """A copy of the shipped policies that a test may edit."""
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    """Replace the first `old` after the file's comment header (which quotes examples)."""
    text = path.read_text()
    body = text.index("\ntenant =")
    assert old in text[body:], f"{old!r} not in {path.name}"
    path.write_text(text[:body] + text[body:].replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line and line[:1] != "#")


def problems_of(directory: Path) -> list[tuple[str, int, str]]:
    return [(Path(p.file).name, p.line, p.field) for p in check_policy_dir(directory)]


def test_shipped_policies_are_clean() -> None:
    """The sample tenants in policies/ load without a single problem."""
    assert check_policy_dir(SHIPPED) == []
    loaded = load_policy_dir(SHIPPED)
    assert sorted(loaded.tenants) == ["acme", "globex"]
    acme = loaded.tenants["acme"]
    assert acme.default_role.arn == "arn:aws:iam::111111111111:role/acme-app"
    assert [r.name for r in acme.roles] == ["acme-app", "acme-reports"]
    assert acme.roles[1].apps == ("reports",)
    assert loaded.tenants["globex"].default_role.name == "globex-app"


def test_digests_cover_file_bytes(policies: Path) -> None:
    """Tenant digests are the sha256 of the file; the set digest changes with any file."""
    import hashlib

    before = load_policy_dir(policies)
    acme_bytes = (policies / "acme.toml").read_bytes()
    assert before.tenants["acme"].digest == hashlib.sha256(acme_bytes).hexdigest()
    edit(policies / "globex.toml", 'description = "', 'description = "Edited. ')
    after = load_policy_dir(policies)
    assert after.digest != before.digest
    assert after.tenants["acme"].digest == before.tenants["acme"].digest


def test_null_value_is_reported_with_line_and_key(policies: Path) -> None:
    """`name = null` (not TOML) names the file, its line and the field it was meant for."""
    acme = policies / "acme.toml"
    edit(acme, 'name = "${tenant}.${task}"', "name = null")
    [problem] = check_policy_dir(policies)
    assert (Path(problem.file).name, problem.line, problem.field) == (
        "acme.toml",
        line_of(acme, "name = null"),
        "session.name",
    )
    assert "no null" in problem.message


def test_unknown_key_is_reported_with_its_path(policies: Path) -> None:
    """A misspelt key inside the second [[roles]] table is reported as roles[1].<key>."""
    acme = policies / "acme.toml"
    edit(acme, 'apps = ["reports"]', 'apps = ["reports"]\ndurations_seconds = 900')
    assert problems_of(policies) == [
        ("acme.toml", line_of(acme, "durations_seconds"), "roles[1].durations_seconds")
    ]


def test_malformed_role_arn_is_reported(policies: Path) -> None:
    """A role ARN with a short account id is refused at its line."""
    acme = policies / "acme.toml"
    edit(acme, "arn:aws:iam::111111111111:role/acme-reports", "arn:aws:iam::1111:role/acme-reports")
    [problem] = check_policy_dir(policies)
    assert (problem.line, problem.field) == (line_of(acme, "iam::1111:role"), "roles[1].arn")
    assert "not an IAM role ARN" in problem.message


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ('""', "empty template"),
        ('"${tenant} ${task}"', "can never contain ' '"),
        ('"${tenant}.${tasks}"', "unknown variable ${tasks}"),
        ('"${tenant}.${task"', "unterminated"),
        ('"${tenant}"', "must contain ${task}"),
        ('"' + "x" * 70 + '${task}"', "no room"),
    ],
)
def test_session_name_that_cannot_be_built_is_refused(
    policies: Path, template: str, complaint: str
) -> None:
    """Session-name templates that can never give a usable RoleSessionName are load errors."""
    acme = policies / "acme.toml"
    edit(acme, 'name = "${tenant}.${task}"', f"name = {template}")
    problems = check_policy_dir(policies)
    assert problems, template
    assert {(p.line, p.field) for p in problems} == {(line_of(acme, "name = "), "session.name")}
    assert any(complaint in p.message for p in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "field", "complaint"),
    [
        ("duration_seconds = 3600", "duration_seconds = 60", "roles[0].duration_seconds", "900"),
        (
            "duration_seconds = 3600",
            "duration_seconds = 1799",
            "roles[0].duration_seconds",
            "under 1800: credentials are refreshed at half-life and never served with less "
            "than 15 minutes left",
        ),
        (
            "duration_seconds = 3600",
            'duration_seconds = "1h"',
            "roles[0].duration_seconds",
            "integer",
        ),
        (
            'apps = ["reports"]',
            'apps = ["reports"]\ndefault = true',
            "roles[1].default",
            "exactly one",
        ),
        ("default = true", "default = false", "roles", "exactly one"),
        # No permissive default: a role without `apps` (cut off mid-write) is refused.
        ('apps = ["reports"]', "", "roles[1].apps", "missing; list the apps"),
        (
            "credentials_rps = 50",
            "credentials_rps = -5",
            "limits.sidecar.credentials_rps",
            "positive",
        ),
        ("burst = 50", "burst = 2.5", "limits.sidecar.burst", "integer"),
        ("burst = 100", 'burst = "lots"', "limits.broker.burst", "integer"),
        ('team = "payments"', "team = 7", "team", "string"),
        (
            'transitive_tag_keys = ["tenant"]',
            'transitive_tag_keys = ["owner"]',
            "session.transitive_tag_keys[0]",
            "not a key",
        ),
        ('team = "${team}"', '"aws:team" = "${team}"', 'session.tags."aws:team"', "aws:"),
        ('kind = "kubernetes"', 'kind = "ecs"', "identities[1].kind", "platform"),
        ('namespace = "acme"', 'namespace = "Acme_Prod"', "identities[1].namespace", "namespace"),
        ("acme-data/${task}", "acme-data/${task_id}", "roles[0].session_policy", "task_id"),
        ('"Effect": "Allow",', '"Effect": "Allow"', "roles[0].session_policy", "JSON"),
    ],
)
def test_each_kind_of_mistake_names_its_field(
    policies: Path, old: str, new: str, field: str, complaint: str
) -> None:
    """Wrong types, ranges, defaults, tags, kinds and templates are reported at their field."""
    edit(policies / "acme.toml", old, new)
    problems = check_policy_dir(policies)
    assert [p.field for p in problems] == [field], problems
    assert complaint in problems[0].message
    assert problems[0].line > 0


def test_session_policy_template_too_long_is_a_load_error(policies: Path) -> None:
    """A session policy whose fixed text alone exceeds 2,048 characters is refused at load."""
    acme = policies / "acme.toml"
    edit(acme, '"Action": [', '"Sid": "' + "S" * 2100 + '", "Action": [')
    [problem] = check_policy_dir(policies)
    assert (problem.field, problem.line) == (
        "roles[0].session_policy",
        line_of(acme, "session_policy"),
    )
    assert "2048" in problem.message


def test_every_problem_in_every_file_is_reported(policies: Path) -> None:
    """One load reports all problems of all files, not just the first one."""
    edit(policies / "acme.toml", 'team = "payments"', 'team = "payments"\ncolour = "red"')
    edit(policies / "acme.toml", "duration_seconds = 3600", "duration_seconds = 5")
    edit(policies / "globex.toml", "222222222222", "22")
    with pytest.raises(PolicyError) as caught:
        load_policy_dir(policies)
    fields = {(Path(p.file).name, p.field) for p in caught.value.problems}
    assert fields == {
        ("acme.toml", "colour"),
        ("acme.toml", "roles[0].duration_seconds"),
        ("globex.toml", "roles[0].arn"),
    }
    assert isinstance(caught.value, ConfigError)
    assert caught.value.detail.count("\n") == 2


def test_file_stem_must_equal_tenant(policies: Path) -> None:
    """A tenant named differently from its file is refused."""
    (policies / "globex.toml").rename(policies / "initech.toml")
    assert problems_of(policies) == [
        ("initech.toml", line_of(policies / "initech.toml", "tenant ="), "tenant")
    ]


def test_identities_claimed_by_two_tenants_name_both_files(policies: Path) -> None:
    """Two files claiming the same platform tenant or namespace are refused, naming both."""
    globex = policies / "globex.toml"
    edit(globex, 'tenant = "globex"\n\n[[identities]]', 'tenant = "acme"\n\n[[identities]]')
    edit(globex, 'namespace = "globex"', 'namespace = "acme"')
    problems = check_policy_dir(policies)
    assert [(Path(p.file).name, p.field) for p in problems] == [
        ("globex.toml", "identities[0]"),
        ("globex.toml", "identities[1]"),
    ]
    assert all("acme.toml" in p.message for p in problems)


def test_empty_or_missing_directory_is_an_error(tmp_path: Path) -> None:
    """No policy files means no tenant could ever be served: refused, not an empty set."""
    with pytest.raises(PolicyError, match=r"no \*\.toml"):
        load_policy_dir(tmp_path)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy_dir(tmp_path / "absent")


def test_limits_and_defaults_are_applied(policies: Path) -> None:
    """Unset limits keep the model defaults; set ones override, floats stay floats."""
    loaded = load_policy_dir(policies)
    acme = loaded.tenants["acme"]
    assert acme.sidecar_limits == SidecarLimits(credentials_rps=50.0, burst=50)
    assert isinstance(acme.sidecar_limits.credentials_rps, float)
    assert loaded.tenants["globex"].sidecar_limits == SidecarLimits()
    assert loaded.tenants["globex"].broker_limits == BrokerLimits(requests_per_second=50.0)


def test_problem_prints_as_file_line_field_message() -> None:
    """A problem's text is the `file:line: field: message` editors understand."""
    problem = PolicyProblem("policies/acme.toml", 7, "roles[0].arn", "bad")
    assert str(problem) == "policies/acme.toml:7: roles[0].arn: bad"


def test_locator_follows_headers_arrays_and_multiline_values() -> None:
    """Lines are found through [[array]] counting, dotted keys and multi-line strings."""
    text = "\n".join(
        [
            'tenant = "x"',  # 1
            "[[roles]]",  # 2
            "arn = 'a'",  # 3
            "[[roles]]",  # 4
            "policy = '''",  # 5
            "[not.a.header]",  # 6
            "'''",  # 7
            "apps = [",  # 8
            '  "a",',  # 9
            "]",  # 10
            "[limits]",  # 11
            "sidecar.burst = 3",  # 12
        ]
    )
    locator = FieldLocator(text)
    assert locator.line_of(("roles", 0, "arn")) == 3
    assert locator.line_of(("roles", 1, "policy")) == 5
    assert locator.line_of(("roles", 1, "apps", 1)) == 8
    assert locator.line_of(("limits", "sidecar", "burst")) == 12
    assert locator.line_of(("not",)) == 0
    assert locator.field_at(6) == ("roles", 1, "policy")
    assert format_path(("session", "tags", "a b")) == 'session.tags."a b"'


def toml_value(value: Any) -> str:
    """Any TOML value written inline, so a fuzzed document is always valid TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    children: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    paths = [path] if path else []
    for key, child in children:
        paths.extend(leaf_paths(child, (*path, key)))
    return paths


scalars = st.one_of(
    st.text(max_size=20),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
toml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_value_anywhere_is_a_reported_problem_not_a_crash(data: st.DataObject) -> None:
    """Replacing any field of acme.toml by any TOML value yields problems or a valid load."""
    document = tomllib.loads((SHIPPED / "acme.toml").read_text())
    path = data.draw(st.sampled_from(leaf_paths(document)))
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(toml_values)
    body = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in document.items())
    body += f"\n{END_LINE}\n"
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "acme.toml").write_text(body)
        problems = check_policy_dir(directory)
        if problems:
            assert all(p.field and p.message for p in problems), problems
            with pytest.raises(PolicyError):
                load_policy_dir(directory)
        else:
            assert load_policy_dir(directory).tenants["acme"].tenant == "acme"
