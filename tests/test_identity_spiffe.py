"""SPIFFE JWT-SVIDs: keys from the trust domain's bundle endpoint, the trust domain to a tenant,
the SPIFFE ID's path to an app and a task; the wrong audience, trust domain or path is refused
(401, audited)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.config import TrustedIssuer, parse_trust
from metaproxy.errors import ConfigError
from metaproxy.identity.keys import load_private_key
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
