"""STS parameters stay within AWS's rules for any tenant, task or app name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.models import Identity
from metaproxy.policy import sts_params
from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.model import (
    IdentityRule,
    RoleRule,
    SessionTemplates,
    TenantPolicy,
)

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
VALID_NAME = re.compile(r"^[\w+=,.@-]{2,64}$", re.ASCII)
TAG_CHARS = re.compile(r"^[\w\s.:/=+\-@]*$")  # \w and \s stand in for \p{L}\p{N} and \p{Z}
ALL_VARIABLES = ".".join(f"${{{name}}}" for name in sts_params.VARIABLES)
POLICY = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject",'
    '"Resource":"arn:aws:s3:::data/${tenant}/${team}/${task}/${app}/*"}]}'
)


def tenant_policy(tenant: str, team: str) -> TenantPolicy:
    """A tenant whose templates use every variable, so every value reaches every parameter."""
    tags = tuple((f"k{i}", f"{ALL_VARIABLES}") for i in range(sts_params.MAX_TAGS))
    return TenantPolicy(
        tenant=tenant,
        team=team,
        file=f"{tenant}.toml",
        digest="0" * 64,
        identities=(IdentityRule(0, "platform", tenant_claim=tenant),),
        roles=(RoleRule(0, "arn:aws:iam::111111111111:role/app", True, session_policy=POLICY),),
        session=SessionTemplates(ALL_VARIABLES, ALL_VARIABLES, tags, ("k0",)),
    )


names = st.text(max_size=300)


@settings(max_examples=300, deadline=None)
@given(tenant=names, team=names, task=names, app=names, kubernetes=st.booleans())
def test_parameters_are_valid_for_any_names(
    tenant: str, team: str, task: str, app: str, kubernetes: bool
) -> None:
    """Session name, SourceIdentity, tags and session policy obey STS limits, or deny cleanly."""
    policy = tenant_policy(tenant, team)
    identity = Identity(
        "kubernetes" if kubernetes else "platform",
        "issuer",
        "subject",
        task,
        tenant=tenant,
        app=app,
        namespace=app if kubernetes else "",
        service_account=app if kubernetes else "",
    )
    try:
        spec = sts_params.build_spec(policy, policy.roles[0], identity)
    except sts_params.SessionPolicyError as exc:
        # Only a wildcard or policy variable in a value, or a too-long rendering, may refuse.
        assert exc.rule in {"session-policy-unsafe-value", "session-policy-too-long"}
        return
    for name in (spec.role_session_name, spec.source_identity):
        assert VALID_NAME.match(name), name
        assert name.isascii()
    assert not spec.source_identity.lower().startswith("aws:")
    assert len(spec.tags) <= sts_params.MAX_TAGS
    for key, value in spec.tags:
        assert 1 <= len(key) <= 128 and not key.lower().startswith("aws:")
        assert len(value) <= 256
        assert TAG_CHARS.match(value), value
    assert spec.session_policy is not None
    assert len(spec.session_policy) <= sts_params.MAX_SESSION_POLICY
    assert spec.session_policy.isascii()
    resource = json.loads(spec.session_policy)["Statement"][0]["Resource"]
    assert resource.endswith(f"/{task}/{app}/*")


@given(text=st.text())
def test_source_identity_never_looks_reserved(text: str) -> None:
    """SourceIdentity is a valid name and never starts with `aws:` in any case."""
    for candidate in (text, "aws:" + text, "AWS:" + text):
        result = sts_params.source_identity(candidate)
        assert VALID_NAME.match(result) and result.isascii()
        assert not result.lower().startswith("aws:")


@given(prefix=st.text(min_size=70, max_size=200), a=st.text(), b=st.text())
def test_distinct_long_task_ids_give_distinct_session_names(prefix: str, a: str, b: str) -> None:
    """Task ids sharing a long prefix still get distinct session names (hash of the full id)."""
    if a == b:
        return
    assert sts_params.session_name(prefix + a) != sts_params.session_name(prefix + b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("acme.task-1", "acme.task-1"),
        ("a" * 64, "a" * 64),
    ],
)
def test_valid_names_are_kept_as_written(text: str, expected: str) -> None:
    """A name STS already accepts is not rewritten, so CloudTrail shows the real task id."""
    assert sts_params.session_name(text) == expected


def test_invalid_names_are_repaired_and_marked() -> None:
    """Disallowed characters become `-`, short or changed names gain a hash suffix."""
    assert re.fullmatch(r"acme\.t-sk-[0-9a-f]{8}", sts_params.session_name("acme.täsk"))
    assert re.fullmatch(r"x-[0-9a-f]{8}", sts_params.session_name("x"))
    assert sts_params.session_name("") != sts_params.session_name("-")
    long = sts_params.session_name("a" * 65)
    assert len(long) == 64 and long.startswith("a" * 55)


def test_session_policy_too_long_at_evaluation_is_refused() -> None:
    """A template that fits at load but not with a long task id raises the too-long rule."""
    template = '{"Statement":[{"Resource":"arn:aws:s3:::b/${task}"}]}'
    with pytest.raises(sts_params.SessionPolicyTooLong):
        sts_params.session_policy(template, {"task": "t" * 3000})
    assert len(sts_params.session_policy(template, {"task": "t" * 100})) < 2048


def test_render_substitutes_json_escaped_values() -> None:
    """Quotes and backslashes in a value cannot break out of the JSON string they sit in."""
    template = '{"Resource":"${task}"}'
    sneaky = '", "Effect": "Allow\\'
    assert json.loads(sts_params.session_policy(template, {"task": sneaky})) == {"Resource": sneaky}
    assert sts_params.render("${tenant}.${task}", {"tenant": "a", "task": "b"}) == "a.b"


def test_shipped_acme_spec() -> None:
    """The shipped acme policy gives the documented AssumeRole parameters."""
    policies = load_policy_dir(SHIPPED)
    acme = policies.tenants["acme"]
    identity = Identity("platform", "metaproxy-platform", "s", "t-1", tenant="acme", app="web")
    spec = sts_params.build_spec(acme, acme.default_role, identity)
    assert (spec.role_session_name, spec.source_identity, spec.duration_seconds) == (
        "acme.t-1",
        "acme.web",
        3600,
    )
