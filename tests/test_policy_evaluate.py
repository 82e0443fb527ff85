"""Policy evaluation: which tenant, which role, and why — or why not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaproxy.models import Identity, SidecarLimits
from metaproxy.policy.evaluate import evaluate, tenant_for
from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.model import IdentityRule, PolicySet, RoleRule, TenantPolicy

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
ACME_APP = "arn:aws:iam::111111111111:role/acme-app"
ACME_REPORTS = "arn:aws:iam::111111111111:role/acme-reports"
GLOBEX_APP = "arn:aws:iam::222222222222:role/globex-app"


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policy_dir(SHIPPED)


def platform(
    tenant: str, task: str = "task-1", app: str = "web", issuer: str = "metaproxy-platform"
) -> Identity:
    return Identity("platform", issuer, f"{tenant}/{task}", task, tenant=tenant, app=app)


def pod(namespace: str, service_account: str, task: str = "pod-1") -> Identity:
    return Identity(
        "kubernetes",
        "https://kubernetes.default.svc",
        f"system:serviceaccount:{namespace}:{service_account}",
        task,
        namespace=namespace,
        service_account=service_account,
    )


def test_two_tenants_get_their_own_default_roles(policies: PolicySet) -> None:
    """acme and globex tasks each get their tenant's default role, scoped to the task."""
    acme = evaluate(policies, platform("acme", "t-1"), None)
    globex = evaluate(policies, platform("globex", "t-2"), None)
    assert (acme.allowed, acme.tenant, acme.team, acme.role_arn) == (
        True,
        "acme",
        "payments",
        ACME_APP,
    )
    assert (globex.allowed, globex.tenant, globex.role_arn) == (True, "globex", GLOBEX_APP)
    assert acme.rule == "acme.toml roles[0]"
    assert acme.spec is not None and globex.spec is not None
    assert acme.spec.role_session_name == "acme.t-1"
    assert globex.spec.role_session_name == "globex.t-2"
    assert acme.policy_digest == policies.digest


def test_default_role_carries_the_rendered_session_policy(policies: PolicySet) -> None:
    """The acme default role is scoped down to the task's own S3 prefix."""
    decision = evaluate(policies, platform("acme", "t-9"), "")
    assert decision.spec is not None and decision.spec.session_policy is not None
    document = json.loads(decision.spec.session_policy)
    assert document["Statement"][0]["Resource"] == "arn:aws:s3:::acme-data/t-9/*"
    assert dict(decision.spec.tags) == {
        "tenant": "acme",
        "task": "t-9",
        "app": "web",
        "team": "payments",
    }
    assert decision.spec.transitive_tag_keys == ("tenant",)
    assert decision.spec.source_identity == "acme.web"


def test_role_outside_the_policy_is_denied_with_a_reason(policies: PolicySet) -> None:
    """acme asking for globex's role is denied, naming the role and acme's file."""
    decision = evaluate(policies, platform("acme"), GLOBEX_APP)
    assert (decision.allowed, decision.rule, decision.tenant) == (False, "role-not-allowed", "acme")
    assert GLOBEX_APP in decision.reason and "acme.toml" in decision.reason
    assert decision.spec is None


def test_role_may_be_asked_for_by_name_or_arn(policies: PolicySet) -> None:
    """`acme-reports` and its full ARN name the same role."""
    by_name = evaluate(policies, platform("acme", app="reports"), "acme-reports")
    by_arn = evaluate(policies, platform("acme", app="reports"), ACME_REPORTS)
    assert by_name.allowed and by_arn.allowed
    assert by_name.rule == by_arn.rule == "acme.toml roles[1]"
    assert by_name.spec == by_arn.spec


def test_app_restriction_denies_other_apps(policies: PolicySet) -> None:
    """Only the `reports` app may get acme-reports; `web` is denied with tenant and limits."""
    decision = evaluate(policies, platform("acme", app="web"), "acme-reports")
    assert (decision.allowed, decision.rule) == (False, "app-not-allowed")
    assert "'web'" in decision.reason and "roles[1]" in decision.reason
    assert (decision.tenant, decision.team) == ("acme", "payments")
    assert decision.sidecar_limits == SidecarLimits(credentials_rps=50.0, burst=50)


def test_kubernetes_identity_maps_namespace_to_tenant(policies: PolicySet) -> None:
    """A pod's namespace decides its tenant; its service account is the app."""
    decision = evaluate(policies, pod("globex", "billing", task="globex-pod-7"), None)
    assert (decision.allowed, decision.tenant, decision.role_arn) == (True, "globex", GLOBEX_APP)
    assert decision.spec is not None
    assert dict(decision.spec.tags)["app"] == "billing"
    reports = evaluate(policies, pod("acme", "reports"), "acme-reports")
    assert (reports.allowed, reports.role_arn) == (True, ACME_REPORTS)
    assert tenant_for(policies, pod("acme", "web")) is policies.tenants["acme"]


def test_unknown_identities_are_denied_as_no_tenant(policies: PolicySet) -> None:
    """A tenant claim or namespace no policy names gets no role at all."""
    for identity in (platform("initech"), pod("kube-system", "default")):
        decision = evaluate(policies, identity, None)
        assert (decision.allowed, decision.rule, decision.tenant) == (False, "no-tenant", "")
        assert tenant_for(policies, identity) is None


def test_issuer_restriction_is_enforced(policies: PolicySet) -> None:
    """acme's platform rule names its issuer: a token from another issuer matches no tenant."""
    decision = evaluate(policies, platform("acme", issuer="someone-else"), None)
    assert decision.rule == "no-tenant"


def test_identity_claimed_by_two_tenants_is_denied_as_ambiguous(tmp_path: Path) -> None:
    """Globs that overlap only at run time (web-* and *-api) deny rather than guess."""
    directory = tmp_path / "policies"
    shutil.copytree(SHIPPED, directory)
    acme = directory / "acme.toml"
    globex = directory / "globex.toml"
    acme.write_text(
        acme.read_text().replace(
            'namespace = "acme"\nservice_accounts = ["*"]',
            'namespace = "shared"\nservice_accounts = ["web-*"]',
        )
    )
    globex.write_text(
        globex.read_text().replace(
            'namespace = "globex"', 'namespace = "shared"\nservice_accounts = ["*-api"]'
        )
    )
    policies = load_policy_dir(directory)
    decision = evaluate(policies, pod("shared", "web-api"), None)
    assert (decision.allowed, decision.rule) == (False, "ambiguous-tenant")
    assert "acme.toml" in decision.reason and "globex.toml" in decision.reason
    assert tenant_for(policies, pod("shared", "web-api")) is None
    assert evaluate(policies, pod("shared", "web-ui"), None).tenant == "acme"


def test_wildcard_task_cannot_widen_the_session_policy(policies: PolicySet) -> None:
    """A task id of `*` would grant the whole bucket through the template: denied instead."""
    decision = evaluate(policies, platform("acme", task="*"), None)
    assert (decision.allowed, decision.rule) == (False, "session-policy-unsafe-value")
    assert decision.tenant == "acme"


def test_evaluation_is_pure(policies: PolicySet) -> None:
    """The same inputs give the same decision, and the policy set is unchanged."""
    digest = policies.digest
    first = evaluate(policies, platform("acme", "t-3"), None)
    assert evaluate(policies, platform("acme", "t-3"), None) == first
    assert policies.digest == digest


def _tenant_with_rules(name: str, rules: tuple[IdentityRule, ...]) -> TenantPolicy:
    role = RoleRule(0, f"arn:aws:iam::111111111111:role/{name}-app", default=True)
    return TenantPolicy(name, "team", f"{name}.toml", "0" * 64, rules, (role,))


platform_rules = st.builds(
    IdentityRule,
    index=st.just(0),
    kind=st.just("platform"),
    issuer=st.sampled_from(["", "metaproxy-platform", "other"]),
    tenant_claim=st.sampled_from(["a", "b", "c"]),
    apps=st.lists(st.sampled_from(["*", "web", "w*", "api"]), min_size=1, max_size=2).map(tuple),
)
kubernetes_rules = st.builds(
    IdentityRule,
    index=st.just(0),
    kind=st.just("kubernetes"),
    issuer=st.sampled_from(["", "https://kubernetes.default.svc"]),
    namespace=st.sampled_from(["a", "b", "ns"]),
    service_accounts=st.lists(st.sampled_from(["*", "web", "api"]), min_size=1, max_size=2).map(
        tuple
    ),
)
identities = st.one_of(
    st.builds(
        platform,
        tenant=st.sampled_from(["a", "b", "c", "d"]),
        app=st.sampled_from(["web", "worker", "api"]),
        issuer=st.sampled_from(["metaproxy-platform", "other"]),
    ),
    st.builds(
        pod,
        namespace=st.sampled_from(["a", "b", "ns"]),
        service_account=st.sampled_from(["web", "api"]),
    ),
)


@given(
    rule_sets=st.lists(
        st.lists(st.one_of(platform_rules, kubernetes_rules), min_size=1, max_size=3),
        min_size=1,
        max_size=6,
    ),
    identity=identities,
)
def test_indexed_lookup_finds_exactly_the_tenants_a_full_scan_finds(
    rule_sets: list[list[IdentityRule]], identity: Identity
) -> None:
    """The broker looks a token's tenant up by its exact tenant claim or namespace; that must
    find the same tenants as asking every tenant's rules, as before the index."""
    tenants = {
        f"t{i}": _tenant_with_rules(f"t{i}", tuple(rules)) for i, rules in enumerate(rule_sets)
    }
    policies = PolicySet(tenants, "digest")
    full_scan = [tenant for tenant in tenants.values() if tenant.claims(identity)]
    assert policies.claiming(identity) == full_scan
