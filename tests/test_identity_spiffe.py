"""SPIFFE JWT-SVIDs: keys from the trust domain's bundle endpoint, the trust domain to a tenant,
the SPIFFE ID's path to an app and a task; the wrong audience, trust domain or path is refused
(401, audited); SPIFFE IDs and path templates are read strictly."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.cli import main
from metaproxy.config import TrustedIssuer, parse_trust
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.keys import load_private_key
from metaproxy.identity.spiffe import DEFAULT_PATHS, PathRule, parse_rules, spiffe_identity
from metaproxy.policy.evaluate import evaluate
from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.problems import PolicyError
from tests.oidc_issuer import LocalIssuer
from tests.secret_scan import ISSUED
from tests.support import Pki, audit_records, broker_config

AUDIENCE = "metaproxy-broker"
DOMAIN = "acme.example"


@pytest.fixture
async def spire(tmp_path: Path) -> AsyncIterator[LocalIssuer]:
    """A trust domain's bundle endpoint (SPIRE's format: x509-svid entries beside JWT keys)."""
    local = LocalIssuer(tmp_path / "spire")
    local.spiffe_bundle = True
    await local.start()
    yield local
    await local.aclose()


def svid(key: Path, sub: str, aud: str = AUDIENCE, **claims: Any) -> str:
    """A JWT-SVID as SPIRE mints it: sub, aud, exp, iat, no iss."""
    private, kid, alg = load_private_key(key)
    now = int(time.time())
    body = {"sub": sub, "aud": [aud], "exp": now + 300, "iat": now, **claims}
    token = jwt.encode(body, private, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
    ISSUED.add(token)
    return token


def spiffe_policy(policies_dir: Path) -> None:
    """acme's tenant claims the workloads of trust domain acme.example."""
    path = policies_dir / "acme.toml"
    rule = f'\n[[identities]]\nkind = "spiffe"\ntrust_domain = "{DOMAIN}"\napps = ["*"]\n'
    path.write_text(path.read_text().replace("\n[[identities]]", rule + "\n[[identities]]", 1))


@pytest.fixture
def key(spire: LocalIssuer) -> Path:
    """The trust domain's JWT signing key, in its bundle before the broker starts."""
    signing = spire.new_key("jwt-svid")
    spire.publish(signing)
    return signing


@pytest.fixture
async def broker(
    spire: LocalIssuer, key: Path, tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    spiffe_policy(policies_dir)
    config = broker_config(tmp_path, pki, sts_url, policies_dir)
    trust = TrustedIssuer(f"spiffe://{DOMAIN}", AUDIENCE, None, "spiffe", spire.jwks_url)
    config = replace(
        config,
        trusted_issuers=(*config.trusted_issuers, trust),
        jwks_ca_file=spire.ca_file,
    )
    server = await BrokerServer.start(config)
    yield server
    await server.aclose()


async def ask(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        return answer.status


def test_a_spiffe_issuer_is_a_trust_domain() -> None:
    """`--trust spiffe://DOMAIN,AUDIENCE,BUNDLE_URL,spiffe`; anything else as a spiffe issuer is
    refused."""
    trust = parse_trust("spiffe://acme.example,metaproxy-broker,https://spire:8443/,spiffe")
    assert (trust.kind, trust.jwks_url) == ("spiffe", "https://spire:8443/")
    with pytest.raises(ConfigError, match="spiffe://TRUST_DOMAIN"):
        parse_trust("https://spire.example,metaproxy-broker,https://spire:8443/,spiffe")


async def test_jwt_svids_map_to_the_tenant_app_and_task(
    key: Path, broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """A JWT-SVID of the trust domain gets the tenant's role; the audit record names the tenant,
    and the app and task its path names by the default rules."""
    by_task = svid(key, f"spiffe://{DOMAIN}/app/billing/task/b-7")
    by_account = svid(key, f"spiffe://{DOMAIN}/ns/payments/sa/ledger")
    assert await ask(https, broker, by_task) == 200
    assert await ask(https, broker, by_account) == 200
    issued = [r for r in audit_records(broker.config.audit_dir) if r["event"] == "issued"]
    assert [(r["tenant"], r["task"]) for r in issued] == [("acme", "b-7"), ("acme", "ledger")]


@pytest.mark.parametrize(
    ("sub", "audience", "reason"),
    [
        (f"spiffe://{DOMAIN}/app/billing/task/b-7", "someone-else", "audience (aud)"),
        ("spiffe://globex.example/app/billing/task/b-7", AUDIENCE, "untrusted issuer"),
        (f"spiffe://{DOMAIN}/db/billing", AUDIENCE, "matches no --spiffe-paths rule"),
        (f"spiffe://{DOMAIN}/app/billing/task/..", AUDIENCE, "invalid SPIFFE path"),
    ],
    ids=["wrong-audience", "wrong-trust-domain", "unmatched-path", "dot-dot-segment"],
)
async def test_a_jwt_svid_outside_the_rules_is_refused_and_audited(
    key: Path,
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    sub: str,
    audience: str,
    reason: str,
) -> None:
    """The wrong audience, a trust domain not trusted, a path no rule fits: 401, audited with
    the failed check."""
    assert await ask(https, broker, svid(key, sub, audience)) == 401
    denied = [r for r in audit_records(broker.config.audit_dir) if r["event"] == "denied"]
    assert denied and denied[-1]["status"] == 401 and reason in denied[-1]["reason"]


@pytest.mark.parametrize(
    ("spiffe_id", "expected"),
    [
        ("spiffe://acme.example/app/web/task/t-1", ("web", "t-1")),
        ("spiffe://acme.example/ns/payments/sa/ledger", ("ledger", "ledger")),
    ],
)
def test_the_default_rules_read_app_and_task(spiffe_id: str, expected: tuple[str, str]) -> None:
    """`/app/{app}/task/{task}` and SPIRE's Kubernetes `/ns/{*}/sa/{app}` (task = app)."""
    claims = {"sub": spiffe_id, "exp": 2_000_000_000}
    identity = spiffe_identity(claims, parse_rules(DEFAULT_PATHS))
    assert (identity.kind, identity.issuer, identity.subject) == (
        "spiffe",
        "spiffe://acme.example",
        spiffe_id,
    )
    assert (identity.app, identity.task) == expected


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://Acme.example/app/web/task/t",  # upper case in the trust domain
        "spiffe://acme.example",  # the trust domain itself, no workload
        "spiffe://acme.example/app//task/t",
        "spiffe://acme.example/app/web/task/t/",
        "spiffe://acme.example/app/./task/t",
        "spiffe://acme.example/app/web/task/t?x=1",
        "spiffe://acme.example:8443/app/web/task/t",
        "spiffe://user@acme.example/app/web/task/t",
        "https://acme.example/app/web/task/t",
        "spiffe://acme.example/app/w%2Fb/task/t",
        "spiffe://acme.example/" + "a" * 2048,
    ],
)
def test_malformed_spiffe_ids_are_refused(spiffe_id: str) -> None:
    """The SPIFFE ID rules: lower-case trust domain, plain segments, nothing else."""
    with pytest.raises(Unauthenticated) as refused:
        spiffe_identity({"sub": spiffe_id, "exp": 2_000_000_000}, parse_rules(DEFAULT_PATHS))
    assert refused.value.reason == "invalid_claims"


def test_a_captured_segment_must_be_a_valid_name() -> None:
    """A path segment that could not be a task name (a leading dot) never reaches a template."""
    claims = {"sub": "spiffe://acme.example/app/.hidden/task/t", "exp": 2_000_000_000}
    with pytest.raises(Unauthenticated, match="app must start with a letter or digit"):
        spiffe_identity(claims, parse_rules(DEFAULT_PATHS))


@pytest.mark.parametrize(
    "template",
    ["app/{app}", "/app/{app}/", "/app/{task}", "/{app}/{app}", "/a*/{app}", "/{app}/{role}"],
)
def test_bad_path_templates_refuse_to_start(template: str) -> None:
    """A template must start with /, hold {app} once, and only names or placeholders."""
    with pytest.raises(ConfigError, match="--spiffe-paths"):
        PathRule.parse(template)


def test_a_policy_claims_a_trust_domain(tmp_path: Path, policies_dir: Path) -> None:
    """`kind = "spiffe"` with a trust domain claims its workloads; a bad trust domain is a
    policy problem with its line."""
    spiffe_policy(policies_dir)
    policies = load_policy_dir(policies_dir)
    claims = {"sub": "spiffe://acme.example/app/web/task/t-1", "exp": 2_000_000_000}
    identity = spiffe_identity(claims, parse_rules(DEFAULT_PATHS))
    decision = evaluate(policies, identity, None)
    assert (decision.allowed, decision.tenant) == (True, "acme")
    elsewhere = {**claims, "sub": "spiffe://globex.example/app/web/task/t-1"}
    other = spiffe_identity(elsewhere, parse_rules(DEFAULT_PATHS))
    assert evaluate(policies, other, None).rule == "no-tenant"
    path = policies_dir / "acme.toml"
    path.write_text(path.read_text().replace(f'"{DOMAIN}"', '"Acme.Example"'))
    with pytest.raises(PolicyError, match="trust_domain"):
        load_policy_dir(policies_dir)


def test_policy_explain_takes_a_spiffe_identity(
    policies_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy explain --kind spiffe --issuer spiffe://DOMAIN --app --task` shows the grant."""
    spiffe_policy(policies_dir)
    argv = ["policy", "explain", str(policies_dir), "--kind", "spiffe", "--task", "t-1"]
    status = main([*argv, "--issuer", f"spiffe://{DOMAIN}", "--app", "web"])
    report = json.loads(capsys.readouterr().out)
    assert (status, report["tenant"]) == (0, "acme")
    assert report["assume_role"]["RoleSessionName"] == "acme.t-1"
    assert main(argv) == 2
