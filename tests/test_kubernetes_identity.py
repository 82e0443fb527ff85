"""A broker trusting a Kubernetes issuer: projected service-account tokens map by namespace."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metaproxy.broker.server import BrokerServer
from metaproxy.config import TrustedIssuer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.identity.keys import jwk_thumbprint, public_jwk
from metaproxy.policy.load import PolicyError
from tests.support import CONTROL_TOKEN, Pki, broker_config

K8S_ISSUER = "https://kubernetes.default.svc"


@pytest.fixture(scope="module")
def cluster_key() -> rsa.RSAPrivateKey:
    """The cluster's service-account signing key (RS256, as kube-apiserver uses)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def k8s_broker(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    cluster_key: rsa.RSAPrivateKey,
    record_secrets: Callable[[BrokerServer], None],
) -> AsyncIterator[BrokerServer]:
    """A broker trusting the platform issuer and the cluster's JWKS (kind kubernetes)."""
    jwk: dict[str, str] = public_jwk(cluster_key.public_key())
    jwks = tmp_path / "cluster.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": jwk_thumbprint(jwk), "alg": "RS256"}]}))
    trusted = (
        TrustedIssuer(ISSUER, AUDIENCE, pki.jwks),
        TrustedIssuer(K8S_ISSUER, AUDIENCE, jwks, "kubernetes"),
    )
    server = await BrokerServer.start(
        broker_config(tmp_path, pki, sts_url, policies_dir, trusted_issuers=trusted)
    )
    yield server
    record_secrets(server)
    await server.aclose()


@pytest.fixture
def service_account_token(
    cluster_key: rsa.RSAPrivateKey, issued_secrets: set[str]
) -> Callable[..., str]:
    """Mint a projected service-account token like the kubelet's, signed by `key`."""

    def mint(
        namespace: str,
        account: str = "web",
        pod: str = "web-7d9f8-abcde",
        key: rsa.RSAPrivateKey | None = None,
        lifetime: int = 3600,
        uid: str = "",
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": [AUDIENCE],
            "exp": now + lifetime,
            "iat": now - 60,
            "nbf": now - 60,
            "iss": K8S_ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": uid or str(uuid.uuid4())},
                "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{account}",
        }
        jwk: dict[str, str] = public_jwk(cluster_key.public_key())
        token = jwt.encode(
            claims, key or cluster_key, algorithm="RS256", headers={"kid": jwk_thumbprint(jwk)}
        )
        issued_secrets.add(token)
        return token

    return mint


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        return answer.status, await answer.json()


@pytest.mark.parametrize(
    ("namespace", "role_arn"),
    [
        ("acme", "arn:aws:iam::111111111111:role/acme-app"),
        ("globex", "arn:aws:iam::222222222222:role/globex-app"),
    ],
)
async def test_service_account_of_a_mapped_namespace_gets_its_tenants_role(
    k8s_broker: BrokerServer,
    https: aiohttp.ClientSession,
    service_account_token: Callable[..., str],
    namespace: str,
    role_arn: str,
) -> None:
    """A pod's token from a namespace a policy maps gets that tenant's default role."""
    uid = str(uuid.uuid4())
    status, body = await ask(
        https, k8s_broker, service_account_token(namespace, "web", "api-0", uid=uid)
    )
    assert status == 200
    assert (body["tenant"], body["task"], body["role_arn"]) == (namespace, f"api-0.{uid}", role_arn)
    assert body["credentials"]["access_key_id"].startswith("ASIA")


async def test_a_pod_name_reused_under_a_new_uid_is_not_the_revoked_task(
    k8s_broker: BrokerServer,
    https: aiohttp.ClientSession,
    service_account_token: Callable[..., str],
) -> None:
    """Revoking pod web-0 (its name and UID) refuses that pod; the next pod named web-0, a new
    UID, is served: the task id carries the UID."""
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    control = k8s_broker.control_url + "/v1/revocations"
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    body = {"tenant": "acme", "task": f"web-0.{first}"}
    async with https.post(control, json=body, headers=headers) as answer:
        assert answer.status == 200

    status, refused = await ask(
        https, k8s_broker, service_account_token("acme", pod="web-0", uid=first)
    )
    assert (status, refused["code"]) == (403, "AccessDenied")
    status, served = await ask(
        https, k8s_broker, service_account_token("acme", pod="web-0", uid=second)
    )
    assert (status, served["task"]) == (200, f"web-0.{second}")


async def test_unmapped_namespace_is_denied_and_audited(
    k8s_broker: BrokerServer,
    https: aiohttp.ClientSession,
    service_account_token: Callable[..., str],
) -> None:
    """A valid token from a namespace no policy maps gets 403, audited as denied."""
    status, body = await ask(
        https, k8s_broker, service_account_token("kube-system", pod="intruder")
    )
    assert (status, body["code"]) == (403, "AccessDenied")
    records = [
        json.loads(line)
        for segment in sorted(k8s_broker.config.audit_dir.glob("segment-*.jsonl"))
        for line in segment.read_text().splitlines()
    ]
    denied = [r for r in records if r.get("task", "").startswith("intruder.")]
    assert [(r["event"], r["status"]) for r in denied] == [("denied", 403)]
    assert denied[0]["subject"] == "system:serviceaccount:kube-system:web"


async def test_bad_service_account_tokens_are_unauthenticated(
    k8s_broker: BrokerServer,
    https: aiohttp.ClientSession,
    service_account_token: Callable[..., str],
) -> None:
    """Tokens signed by another key, expired, or tampered with get 401."""
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header, _, signature = service_account_token("acme").split(".")
    tampered = service_account_token("globex").split(".")[1]
    for token in (
        service_account_token("acme", key=stranger),
        service_account_token("acme", lifetime=-3600),
        f"{header}.{tampered}.{signature}",
    ):
        status, body = await ask(https, k8s_broker, token)
        assert (status, body["code"]) == (401, "Unauthenticated")


async def test_broker_refuses_unpinned_kubernetes_rules_when_two_clusters_are_trusted(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """Two clusters trusted and a rule without `issuer`: the broker does not start, and says
    which file, line and field (a dev cluster's namespace must not get production's role)."""
    acme = policies_dir / "acme.toml"
    pinned = f'issuer = "{K8S_ISSUER}"\nnamespace = "acme"'
    text = acme.read_text()
    assert pinned in text
    acme.write_text(text.replace(pinned, 'namespace = "acme"'))
    line = acme.read_text().splitlines().index('namespace = "acme"')  # the table's first line
    trusted = (
        TrustedIssuer(ISSUER, AUDIENCE, pki.jwks),
        TrustedIssuer(K8S_ISSUER, AUDIENCE, pki.jwks, "kubernetes"),
        TrustedIssuer("https://dev.example", AUDIENCE, pki.jwks, "kubernetes"),
    )
    config = broker_config(tmp_path, pki, sts_url, policies_dir, trusted_issuers=trusted)
    with pytest.raises(PolicyError) as refused:
        await BrokerServer.start(config)
    [problem] = refused.value.problems
    assert (Path(problem.file).name, problem.field) == ("acme.toml", "identities[1].issuer")
    assert problem.line in (line - 1, line)  # `[[identities]]` or `kind`, both of the rule
    assert "more than one Kubernetes issuer" in problem.message
