"""The IAM documents in deploy/aws: well formed, granting exactly the calls the broker makes, and
accepting exactly what the broker sends (ExternalId, SourceIdentity, session tags) for the
shipped policies, hop by hop for a chain; and the ECS task definition, run by our own parser.

IAM itself cannot run here, so `allowed` evaluates the one slice of IAM these documents use:
Allow statements, exact or wildcard actions and resources, and the condition operators below,
with AWS's semantics for a missing key (StringEquals/StringLike: no match; ForAllValues: match).
A principal is matched by the ARN of the role whose session makes the call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaproxy.broker.credentials.sts import assume_role_arguments
from metaproxy.models import AssumeRoleSpec, Identity
from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.model import PolicySet, RoleRule, TenantPolicy
from metaproxy.policy.sts_params import build_spec

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "deploy" / "aws"
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE_POLICIES = KUBERNETES / "base" / "policies"
CHAIN_POLICIES = ROOT / "policies" / "examples" / "eks-pod-identity"
SETTINGS: dict[str, str] = yaml.safe_load((KUBERNETES / "overlays/eks/settings.yaml").read_text())[
    "data"
]
BROKER_ROLE = SETTINGS["broker-role-arn"]
TRUST_POLICIES = (
    "broker-trust-policy.json",
    "tenant-role-trust-policy.json",
    "hub-role-trust-policy.json",
    "chained-role-trust-policy.json",
    "ecs-tenant-role-trust-policy.json",
    "ecs-task-role-trust-policy.json",
)
IDENTITY_POLICIES = (
    "broker-policy.json",
    "hub-role-policy.json",
    "tenant-role-permissions-example.json",
)

# The IAM action each API call needs (AWS's Service Authorization Reference); the operations are
# checked against botocore's service models below.
ACTION_OF_OPERATION = {
    ("sts", "AssumeRole"): "sts:AssumeRole",
    ("sts", "AssumeRoleWithWebIdentity"): "sts:AssumeRoleWithWebIdentity",
    ("s3", "PutObject"): "s3:PutObject",
    ("s3", "GetObject"): "s3:GetObject",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
}
# AssumeRole parameters that need a permission of their own (actions with no API operation), and
# those that need none beyond sts:AssumeRole. A parameter in neither fails the tests: a new one
# the broker starts sending must be looked up, and granted in the documents if it needs it.
ACTION_OF_PARAMETER = {
    "Tags": "sts:TagSession",
    "TransitiveTagKeys": "sts:TagSession",
    "SourceIdentity": "sts:SetSourceIdentity",
}
PLAIN_PARAMETERS = frozenset(
    {"RoleArn", "RoleSessionName", "DurationSeconds", "Policy", "ExternalId"}
)
KNOWN_ACTIONS = frozenset(ACTION_OF_OPERATION.values()) | frozenset(ACTION_OF_PARAMETER.values())
OPERATORS = frozenset({"StringEquals", "StringLike", "ArnLike", "ForAllValues:StringEquals"})
CONDITION_KEYS = frozenset(
    {
        "sts:ExternalId",
        "sts:SourceIdentity",
        "sts:RoleSessionName",
        "aws:TagKeys",
        "s3:prefix",
        "aws:SourceAccount",
        "aws:SourceArn",
    }
)
TAG_KEY = re.compile(r"aws:(RequestTag|PrincipalTag)/[\w.:/=+@-]{1,128}")
OIDC_KEY = re.compile(r"oidc\.eks\.[a-z0-9-]+\.amazonaws\.com/id/[A-Z0-9]+:(sub|aud)")
POLICY_VARIABLE = re.compile(r"\$\{(aws:PrincipalTag/[^}]+)\}")

Context = Mapping[str, str | tuple[str, ...]]


def document(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((AWS / name).read_text())
    return result


def listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@dataclass(frozen=True)
class Request:
    """One authorization IAM makes: `principal` (the calling role) does `action` on `resource`."""

    principal: str
    action: str
    resource: str
    context: Context = field(default_factory=dict)


def conditions_hold(conditions: Mapping[str, Mapping[str, Any]], context: Context) -> bool:
    for operator, pairs in conditions.items():
        for key, expected in pairs.items():
            wanted = listed(expected)
            value = context.get(key)
            if operator == "StringEquals":
                ok = isinstance(value, str) and value in wanted
            elif operator in ("StringLike", "ArnLike"):  # alike for ARNs without variables
                ok = isinstance(value, str) and any(fnmatchcase(value, w) for w in wanted)
            elif operator == "ForAllValues:StringEquals":
                ok = value is None or all(v in wanted for v in value)
            else:
                raise AssertionError(f"no model of {operator}")
            if not ok:
                return False
    return True


def allowed(policy: Mapping[str, Any], request: Request) -> bool:
    """True if a statement of `policy` (a trust policy when it names principals) allows it."""
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", "the model has no Deny"
        if not any(fnmatchcase(request.action, a) for a in listed(statement["Action"])):
            continue
        if "Principal" in statement:
            principals = [p for values in statement["Principal"].values() for p in listed(values)]
            if request.principal not in principals:
                continue
        elif not any(fnmatchcase(request.resource, r) for r in listed(statement["Resource"])):
            continue
        if conditions_hold(statement.get("Condition", {}), request.context):
            return True
    return False


def requests(spec: AssumeRoleSpec, caller: str, persisted_source: str = "") -> list[Request]:
    """What IAM authorizes for one AssumeRole call the broker sends for `spec`, by `caller`.

    `persisted_source`: the SourceIdentity a chain's first hop set, which the second carries
    and which the next role's trust must allow (sts:SetSourceIdentity) as if it were set again.
    """
    arguments = assume_role_arguments(spec)
    assert set(arguments) <= PLAIN_PARAMETERS | set(ACTION_OF_PARAMETER), set(arguments)
    context: dict[str, str | tuple[str, ...]] = {
        "sts:RoleSessionName": arguments["RoleSessionName"]
    }
    actions = {"sts:AssumeRole"} | {
        ACTION_OF_PARAMETER[p] for p in arguments if p in ACTION_OF_PARAMETER
    }
    if "ExternalId" in arguments:
        context["sts:ExternalId"] = arguments["ExternalId"]
    source = arguments.get("SourceIdentity") or persisted_source
    if source:
        context["sts:SourceIdentity"] = source
        actions.add("sts:SetSourceIdentity")
    tags = arguments.get("Tags", [])
    for tag in tags:
        context[f"aws:RequestTag/{tag['Key']}"] = tag["Value"]
    if tags:
        context["aws:TagKeys"] = tuple(tag["Key"] for tag in tags)
    return [Request(caller, action, spec.role_arn, context) for action in sorted(actions)]


def load(directory: Path) -> PolicySet:
    return load_policy_dir(directory, kubernetes_issuers=[SETTINGS["issuer"]])


def identity_for(tenant: TenantPolicy, role: RoleRule) -> Identity:
    """A pod of the tenant that may get `role`: its namespace, a service account its globs and
    the role's apps both match, the overlay's cluster."""
    (rule,) = [r for r in tenant.identities if r.kind == "kubernetes"]
    accounts = [a.replace("*", "x") for a in role.apps if role.allows_app(a.replace("*", "x"))]
    account = next(a for a in accounts if any(fnmatchcase(a, g) for g in rule.service_accounts))
    return Identity(
        kind="kubernetes",
        issuer=SETTINGS["issuer"],
        subject=f"system:serviceaccount:{rule.namespace}:{account}",
        task=f"{account}-7f9c",
        namespace=rule.namespace,
        service_account=account,
        pod_name=f"{account}-7f9c",
        cluster_name=SETTINGS["cluster-name"],
        cluster_arn=SETTINGS["cluster-arn"],
    )


def with_context(request: Request, **changes: str | tuple[str, ...] | None) -> Request:
    context = dict(request.context)
    for key, value in changes.items():
        name = key.replace("__", "/").replace("_", ":", 1)
        if value is None:
            context.pop(name, None)
        else:
            context[name] = value
    return Request(request.principal, request.action, request.resource, context)


# ---- well formed --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRUST_POLICIES + IDENTITY_POLICIES)
def test_document_is_a_well_formed_policy(name: str) -> None:
    """Version 2012-10-17; named Allow statements of known actions, operators and condition keys;
    principals in trust policies, resources in the others."""
    policy = document(name)
    assert policy["Version"] == "2012-10-17"
    sids = [statement["Sid"] for statement in policy["Statement"]]
    assert len(set(sids)) == len(sids) and all(re.fullmatch(r"[A-Za-z0-9]+", s) for s in sids)
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(listed(statement["Action"])) <= KNOWN_ACTIONS
        assert ("Principal" in statement) == (name in TRUST_POLICIES)
        assert ("Resource" in statement) == (name in IDENTITY_POLICIES)
        for operator, pairs in statement.get("Condition", {}).items():
            assert operator in OPERATORS
            for key in pairs:
                known = key in CONDITION_KEYS or TAG_KEY.fullmatch(key) or OIDC_KEY.fullmatch(key)
                assert known, key


def test_actions_are_those_of_real_operations_and_parameters() -> None:
    """Each operation of the action table is in botocore's service model, and AssumeRole takes
    every parameter the tables name."""
    import botocore.session

    session = botocore.session.get_session()
    for service, operation in ACTION_OF_OPERATION:
        assert operation in session.get_service_model(service).operation_names
    assume_role = session.get_service_model("sts").operation_model("AssumeRole")
    assert assume_role.input_shape is not None
    members = set(assume_role.input_shape.members)
    assert PLAIN_PARAMETERS | set(ACTION_OF_PARAMETER) <= members


# ---- the broker's role --------------------------------------------------------------------------


def test_broker_may_assume_exactly_the_roles_its_policies_name() -> None:
    """For every role of the shipped policies, each authorization of the broker's call passes
    the broker's policy; the policy names no role the policies do not."""
    policy = document("broker-policy.json")
    policies = load(BASE_POLICIES)
    assumed = set()
    for tenant in policies.tenants.values():
        for role in tenant.roles:
            spec = build_spec(tenant, role, identity_for(tenant, role))
            first = spec.via or spec
            assumed.add(first.role_arn)
            for request in requests(first, BROKER_ROLE):
                assert allowed(policy, request), request
    (statement,) = [s for s in policy["Statement"] if "sts:AssumeRole" in listed(s["Action"])]
    assert set(listed(statement["Resource"])) == assumed


def test_broker_trust_is_irsa_for_the_brokers_service_account_only() -> None:
    """The cluster's OIDC provider (settings.yaml's issuer) may give the role to the broker's
    ServiceAccount, for STS, and to no other service account or audience."""
    trust = document("broker-trust-policy.json")
    account = yaml.safe_load((KUBERNETES / "base" / "broker-serviceaccount.yaml").read_text())
    host = SETTINGS["issuer"].removeprefix("https://")
    broker_account = BROKER_ROLE.split(":")[4]
    provider = f"arn:aws:iam::{broker_account}:oidc-provider/{host}"
    subject = (
        f"system:serviceaccount:{account['metadata']['namespace']}:{account['metadata']['name']}"
    )
    request = Request(
        provider,
        "sts:AssumeRoleWithWebIdentity",
        BROKER_ROLE,
        {f"{host}:sub": subject, f"{host}:aud": "sts.amazonaws.com"},
    )
    assert allowed(trust, request)
    other = dict(request.context, **{f"{host}:sub": "system:serviceaccount:shop:orders"})
    assert not allowed(trust, Request(provider, request.action, BROKER_ROLE, other))
    wrong_audience = dict(request.context, **{f"{host}:aud": "metaproxy-broker"})
    assert not allowed(trust, Request(provider, request.action, BROKER_ROLE, wrong_audience))


@dataclass
class Calls:
    """The S3 operations a client made, with their parameters (botocore's own event)."""

    made: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.made.append((model.name, dict(params)))


async def test_audit_shipping_needs_exactly_what_the_broker_policy_grants(
    tmp_path: Path, client_factory: Callable[[], Any]
) -> None:
    """The shipper, run as the broker runs it (bucket and prefix from settings.yaml's
    audit-s3-url and the replica's name), makes only calls the policy allows, and the policy's
    S3 actions are exactly those calls'."""
    from metaproxy.audit.record import make_record
    from metaproxy.audit.ship import S3Shipper
    from metaproxy.audit.signing_keys import write_keypair
    from metaproxy.audit.writer import AuditLog
    from metaproxy.broker.auditing import BrokerAudit
    from metaproxy.broker.config import BrokerConfig
    from metaproxy.broker.metrics import BrokerMetrics
    from metaproxy.broker.store.memory import MemoryStore
    from metaproxy.clock import SystemClock
    from metaproxy.config import build_config

    environ = {
        "METAPROXY_AUDIT_S3_URL": SETTINGS["audit-s3-url"],
        "METAPROXY_AUDIT_DIR": str(tmp_path / "unused"),
        "METAPROXY_INSTANCE": "metaproxy-broker-6d9f8-x2x4q",
    }
    config = build_config(BrokerConfig, None, environ)
    store = MemoryStore(None, budget_per_second=1.0)
    broker = BrokerAudit(config, store.replicas, SystemClock(), BrokerMetrics())
    assert broker.shipper is not None
    calls = Calls()

    def recording_client() -> Any:
        client = client_factory()
        client.meta.events.register("provide-client-params.s3", calls.record)
        return client

    client_factory().create_bucket(Bucket=broker.shipper.bucket)
    shipper = S3Shipper(
        bucket=broker.shipper.bucket, prefix=broker.shipper.prefix, client_factory=recording_client
    )
    await shipper.start()
    private, _ = write_keypair(tmp_path / "keys")
    log = AuditLog(
        tmp_path / "log",
        log_id="broker-a",
        signing_key=private,
        segment_max_bytes=2000,
        checkpoint_every_records=5,
        on_segment_closed=shipper.enqueue,
    )
    await log.start()
    for n in range(20):
        await log.append(make_record("issued", request_id=f"req-{n}", task="t", tenant="shop"))
    await log.aclose()
    await shipper.backfill(tmp_path / "log")  # what the broker does at start: list, then send
    await shipper.aclose()

    policy = document("broker-policy.json")
    needed = set()
    for operation, params in calls.made:
        action = ACTION_OF_OPERATION["s3", operation]
        needed.add(action)
        if operation == "ListObjectsV2":
            resource = f"arn:aws:s3:::{params['Bucket']}"
            request = Request(BROKER_ROLE, action, resource, {"s3:prefix": params["Prefix"]})
        else:
            request = Request(
                BROKER_ROLE, action, f"arn:aws:s3:::{params['Bucket']}/{params['Key']}"
            )
        assert allowed(policy, request), request
    assert needed == {"s3:PutObject", "s3:ListBucket"}
    granted = {a for s in policy["Statement"] for a in listed(s["Action"]) if a.startswith("s3:")}
    assert granted == needed


# ---- a tenant's role -----------------------------------------------------------------------------


def shop_requests(role_name: str) -> list[Request]:
    tenant = load(BASE_POLICIES).tenants["shop"]
    role = tenant.find_role(role_name)
    assert role is not None
    return requests(build_spec(tenant, role, identity_for(tenant, role)), BROKER_ROLE)


@pytest.mark.parametrize("role_name", ["shop-orders", "shop-reports"])
def test_tenant_role_trusts_the_broker_for_its_tenant_only(role_name: str) -> None:
    """The trust policy passes every authorization of the broker's call for tenant shop, and
    refuses another tenant's ExternalId or tags, a missing ExternalId, an unknown tag key,
    another SourceIdentity, and any other caller."""
    trust = document("tenant-role-trust-policy.json")
    calls = shop_requests(role_name)
    assert {r.action for r in calls} == {
        "sts:AssumeRole",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    }
    for request in calls:
        assert allowed(trust, request), request
    by_action = {r.action: r for r in calls}
    refused = [
        with_context(by_action["sts:AssumeRole"], sts_ExternalId="globex"),
        with_context(by_action["sts:AssumeRole"], sts_ExternalId=None),
        with_context(by_action["sts:TagSession"], aws_RequestTag__tenant="globex"),
        with_context(by_action["sts:TagSession"], aws_TagKeys=("tenant", "namespace", "app", "x")),
        with_context(by_action["sts:SetSourceIdentity"], sts_SourceIdentity="globex.web"),
        *(
            Request("arn:aws:iam::111122223333:role/other", r.action, r.resource, r.context)
            for r in calls
        ),
    ]
    for request in refused:
        assert not allowed(trust, request), request


def test_tenant_permissions_example_scopes_by_tags_the_broker_sets() -> None:
    """Every ${aws:PrincipalTag/KEY} of the example names a session tag the broker sets."""
    text = (AWS / "tenant-role-permissions-example.json").read_text()
    used = {
        variable.removeprefix("aws:PrincipalTag/") for variable in POLICY_VARIABLE.findall(text)
    }
    assert used
    (tags,) = {
        r.context["aws:TagKeys"]
        for r in shop_requests("shop-orders")
        if r.action == "sts:TagSession"
    }
    assert used <= set(tags)


# ---- chaining -----------------------------------------------------------------------------------


def test_chain_is_trusted_hop_by_hop() -> None:
    """partner-upload through shop-hub (the EKS example): the hub trusts the broker for the first
    hop, the hub may make the second, the role trusts the hub with the ExternalId rendered for
    the overlay's cluster, and refuses it for another cluster."""
    tenant = load(CHAIN_POLICIES).tenants["shop"]
    role = tenant.find_role("partner-upload")
    assert role is not None and role.via is not None
    spec = build_spec(tenant, role, identity_for(tenant, role))
    assert spec.via is not None
    first = requests(spec.via, BROKER_ROLE)
    second = requests(spec, spec.via.role_arn, persisted_source=spec.via.source_identity)
    for request in first:
        assert allowed(document("hub-role-trust-policy.json"), request), request
    for request in second:
        assert allowed(document("hub-role-policy.json"), request), request
        assert allowed(document("chained-role-trust-policy.json"), request), request
    (assume,) = [r for r in second if r.action == "sts:AssumeRole"]
    assert assume.context["sts:ExternalId"] == f"shop-{SETTINGS['cluster-name']}"
    other_cluster = with_context(assume, sts_ExternalId="shop-other-cluster")
    assert not allowed(document("chained-role-trust-policy.json"), other_cluster)
    from_broker = Request(BROKER_ROLE, assume.action, assume.resource, assume.context)
    assert not allowed(document("chained-role-trust-policy.json"), from_broker)


# ---- ECS (docs/ecs.md) --------------------------------------------------------------------------

ECS_POLICIES = ROOT / "policies" / "examples" / "ecs"
ECS_TASK_DEFINITION = AWS / "ecs-task-definition.json"
ECS_ACCOUNT = "111122223333"
# The broker's rule for the example (docs/ecs.md): shop's task roles, the role's name as the app.
ECS_RULE = f"{ECS_ACCOUNT}:shop-*:shop"
ECS_TASK_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def ecs_identity(task_role: str) -> Identity:
    """What the broker makes of an attestation by `task_role` (the name) for one ECS task."""
    from metaproxy.broker.attest.rules import attested_identity, parse_rule

    arn = f"arn:aws:sts::{ECS_ACCOUNT}:assumed-role/{task_role}/{ECS_TASK_ID}"
    return attested_identity(
        arn, ECS_ACCOUNT, [parse_rule(ECS_RULE)], access_key_id="ASIAEXAMPLE", expires_at=0
    )


def ecs_requests(role_name: str) -> list[Request]:
    tenant = load(ECS_POLICIES).tenants["shop"]
    role = tenant.find_role(role_name)
    assert role is not None
    identity = ecs_identity(role.apps[0])
    assert tenant.claims(identity)
    return requests(build_spec(tenant, role, identity), BROKER_ROLE)


@pytest.mark.parametrize("role_name", ["shop-orders", "shop-reports"])
def test_ecs_tenant_role_trusts_the_broker_for_its_tenants_tasks_only(role_name: str) -> None:
    """For an attested ECS task of tenant shop, every authorization of the broker's call passes
    the broker's policy and the role's trust; another tenant's ExternalId, tags or
    SourceIdentity, an unknown tag key, and any other caller are refused."""
    trust = document("ecs-tenant-role-trust-policy.json")
    calls = ecs_requests(role_name)
    assert {r.action for r in calls} == {
        "sts:AssumeRole",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    }
    for request in calls:
        assert allowed(trust, request), request
        assert allowed(document("broker-policy.json"), request), request
    by_action = {r.action: r for r in calls}
    assert by_action["sts:AssumeRole"].context["sts:RoleSessionName"] == f"shop.{ECS_TASK_ID}"
    refused = [
        with_context(by_action["sts:AssumeRole"], sts_ExternalId="globex"),
        with_context(by_action["sts:AssumeRole"], sts_ExternalId=None),
        with_context(by_action["sts:TagSession"], aws_RequestTag__tenant="globex"),
        with_context(by_action["sts:TagSession"], aws_TagKeys=("tenant", "app", "task", "x")),
        with_context(by_action["sts:SetSourceIdentity"], sts_SourceIdentity="globex.web"),
        *(
            Request(f"arn:aws:iam::{ECS_ACCOUNT}:role/other", r.action, r.resource, r.context)
            for r in calls
        ),
    ]
    for request in refused:
        assert not allowed(trust, request), request


def test_ecs_task_role_is_given_to_this_accounts_tasks_only() -> None:
    """ECS may give the task role to tasks of this account's clusters; not to another
    account's, nor to another service."""
    trust = document("ecs-task-role-trust-policy.json")
    task_role = json.loads(ECS_TASK_DEFINITION.read_text())["taskRoleArn"]
    context = {
        "aws:SourceAccount": ECS_ACCOUNT,
        "aws:SourceArn": f"arn:aws:ecs:us-east-1:{ECS_ACCOUNT}:task/prod/{ECS_TASK_ID}",
    }
    request = Request("ecs-tasks.amazonaws.com", "sts:AssumeRole", task_role, context)
    assert allowed(trust, request)
    other = {"aws:SourceAccount": "999999999999", "aws:SourceArn": "arn:aws:ecs:us-east-1:9:x"}
    assert not allowed(trust, Request(request.principal, request.action, task_role, other))
    assert not allowed(trust, Request("ec2.amazonaws.com", request.action, task_role, context))


def test_ecs_task_role_may_do_nothing_but_attest() -> None:
    """The task role's only policy denies everything: GetCallerIdentity needs no permission and
    no deny stops it, so an app that goes around the sidecar to ECS's agent gets nothing."""
    policy = document("ecs-task-role-deny-all.json")
    assert policy["Version"] == "2012-10-17"
    assert [(s["Effect"], s["Action"], s["Resource"]) for s in policy["Statement"]] == [
        ("Deny", "*", "*")
    ]


def test_ecs_task_definition_runs_the_sidecar_first_and_gives_the_app_only_its_endpoint() -> None:
    """awsvpc; the sidecar is essential, attests with the task role, and is healthy when its
    /readyz is; the app starts once it is, reads the sidecar's token from the shared volume,
    reaches it at its own FULL_URI, and drops the agent's RELATIVE_URI that SDKs prefer."""
    from metaproxy.cli import build_parser
    from metaproxy.config import build_config
    from metaproxy.sidecar.config import SidecarConfig

    task = json.loads(ECS_TASK_DEFINITION.read_text())
    assert task["networkMode"] == "awsvpc"
    sidecar, app = task["containerDefinitions"]
    config = build_config(SidecarConfig, build_parser().parse_args(sidecar["command"]), {})
    assert sidecar["essential"] is True
    assert config.identity_source == "aws-ecs" and config.aws_attest_audience
    health = " ".join(sidecar["healthCheck"]["command"])
    assert f"http://{config.admin_listen}/readyz" in health
    assert app["dependsOn"] == [{"containerName": sidecar["name"], "condition": "HEALTHY"}]
    env = {entry["name"]: entry["value"] for entry in app["environment"]}
    assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == (
        f"http://{config.container_listen[0]}/v1/credentials"
    )
    assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] == str(config.authorization_token_file)
    assert env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] == f"http://{config.imds_listen[0]}"
    assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" not in env
    assert app["entryPoint"] == ["env", "-u", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    (shared,) = [m for m in app["mountPoints"] if m["readOnly"]]
    assert str(config.authorization_token_file).startswith(shared["containerPath"] + "/")
    # The task role is one the broker's rule places, in a tenant the example policy claims.
    task_role = task["taskRoleArn"].rsplit("/", 1)[1]
    assert load(ECS_POLICIES).tenants["shop"].claims(ecs_identity(task_role))


def test_ecs_doc_shows_the_shipped_task_definition() -> None:
    """docs/ecs.md's task definition is deploy/aws/ecs-task-definition.json."""
    text = (ROOT / "docs" / "ecs.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    shown = [json.loads(block) for block in blocks if '"containerDefinitions"' in block]
    assert shown == [json.loads(ECS_TASK_DEFINITION.read_text())]
