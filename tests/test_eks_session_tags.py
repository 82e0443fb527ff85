"""EKS Pod Identity-compatible session tags: a Kubernetes identity under the sample policy
(policies/examples/eks-pod-identity) gets exactly EKS's six tags, as the local STS received
them at the fault proxy; a role with `session_tags = false` gets none on either hop."""

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
from metaproxy.demo.local import AUDIENCE
from metaproxy.identity.keys import jwk_thumbprint, public_jwk
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import REPO, Pki, broker_config

SAMPLE = REPO / "policies" / "examples" / "eks-pod-identity"
K8S_ISSUER = "https://oidc.eks.us-west-2.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
CLUSTER_NAME = "shop-prod"
CLUSTER_ARN = f"arn:aws:eks:us-west-2:444444444444:cluster/{CLUSTER_NAME}"
POD_UID = str(uuid.uuid4())


@pytest.fixture(scope="module")
def cluster_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def eks_broker(
    tmp_path: Path,
    pki: Pki,
    proxy: FaultProxy,
    cluster_key: rsa.RSAPrivateKey,
    record_secrets: Callable[[BrokerServer], None],
) -> AsyncIterator[BrokerServer]:
    """A broker trusting the cluster's tokens, configured with its name and ARN, running the
    sample policy against the local STS behind the fault proxy."""
    jwk: dict[str, str] = public_jwk(cluster_key.public_key())
    jwks = tmp_path / "cluster.jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": jwk_thumbprint(jwk), "alg": "RS256"}]}))
    config = broker_config(
        tmp_path,
        pki,
        proxy.url,
        SAMPLE,
        trusted_issuers=(TrustedIssuer(K8S_ISSUER, AUDIENCE, jwks, "kubernetes"),),
        cluster_name=CLUSTER_NAME,
        cluster_arn=CLUSTER_ARN,
    )
    server = await BrokerServer.start(config)
    yield server
    record_secrets(server)
    await server.aclose()


def pod_token(key: rsa.RSAPrivateKey, account: str, pod: str, issued: set[str]) -> str:
    """A projected service-account token as the kubelet writes it for a pod."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": [AUDIENCE],
        "exp": now + 3600,
        "iat": now - 60,
        "nbf": now - 60,
        "iss": K8S_ISSUER,
        "kubernetes.io": {
            "namespace": "shop",
            "pod": {"name": pod, "uid": POD_UID},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
        },
        "sub": f"system:serviceaccount:shop:{account}",
    }
    jwk: dict[str, str] = public_jwk(key.public_key())
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": jwk_thumbprint(jwk)})
    issued.add(token)
    return token


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str, role: str | None = None
) -> int:
    body = {"role": role} if role else {}
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json=body, headers=headers) as answer:
        await answer.read()
        return answer.status


async def test_kubernetes_identity_gets_exactly_eks_pod_identitys_six_tags(
    eks_broker: BrokerServer,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    cluster_key: rsa.RSAPrivateKey,
    issued_secrets: set[str],
) -> None:
    """The AssumeRole call the local STS received carries the six EKS tags, with the pod's
    name and uid from the token and the cluster's name and ARN from the broker's settings."""
    token = pod_token(cluster_key, "cart", "cart-7d9f8-x2k4q", issued_secrets)
    assert await ask(https, eks_broker, token) == 200
    (call,) = proxy.assume_role_calls()
    assert call.params["RoleArn"] == "arn:aws:iam::444444444444:role/shop-app"
    assert call.tags() == {
        "eks-cluster-arn": CLUSTER_ARN,
        "eks-cluster-name": CLUSTER_NAME,
        "kubernetes-namespace": "shop",
        "kubernetes-service-account": "cart",
        "kubernetes-pod-name": "cart-7d9f8-x2k4q",
        "kubernetes-pod-uid": POD_UID,
    }


async def test_a_role_with_session_tags_off_gets_none_on_either_hop(
    eks_broker: BrokerServer,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    cluster_key: rsa.RSAPrivateKey,
    issued_secrets: set[str],
) -> None:
    """`session_tags = false` on a chained role: neither the hub nor the partner call carries
    tags or transitive keys (an account without sts:TagSession would refuse them)."""
    token = pod_token(cluster_key, "uploader", "uploader-0", issued_secrets)
    assert await ask(https, eks_broker, token, role="partner-upload") == 200
    hub, partner = proxy.assume_role_calls()
    assert partner.params["ExternalId"] == f"shop-{CLUSTER_NAME}"
    for call in (hub, partner):
        assert call.tags() == {}
        assert call.transitive_tag_keys() == []
