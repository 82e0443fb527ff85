"""Identity tokens: what the broker accepts, and every way a forged or stale token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.issue import issue_token
from metaproxy.identity.keys import generate_keypair, jwk_thumbprint, load_private_key, public_jwk
from metaproxy.identity.verify import IdentityVerifier
from metaproxy.testing.clocks import ManualClock

NOW = 1_700_000_000.0
AUDIENCE = "metaproxy-broker"
ISSUER_A = "https://platform-a.example"
ISSUER_B = "https://platform-b.example"
K8S_ISSUER = "https://kubernetes.default.svc"


def clock_at(seconds: float) -> ManualClock:
    return ManualClock(datetime.fromtimestamp(seconds, UTC))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def platform_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER_A,
        "aud": AUDIENCE,
        "sub": "task:acme/task-1",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 3600,
        "jti": "token-id-1",
        "task": "task-1",
        "tenant": "acme",
        "app": "web",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@dataclass
class Keys:
    a_key: Path
    a_jwks: Path
    b_key: Path
    b_jwks: Path
    impostor_key: Path  # a different key that will claim issuer A's kid


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    a_key, a_jwks = generate_keypair(tmp_path / "a", "identity", "EdDSA")
    b_key, b_jwks = generate_keypair(tmp_path / "b", "identity", "EdDSA")
    impostor_key, _ = generate_keypair(tmp_path / "impostor", "identity", "EdDSA")
    return Keys(a_key, a_jwks, b_key, b_jwks, impostor_key)


@pytest.fixture
def clock() -> ManualClock:
    return clock_at(NOW)


@pytest.fixture
def verifier(keys: Keys, clock: ManualClock) -> IdentityVerifier:
    return IdentityVerifier(
        [
            TrustedIssuer(ISSUER_A, AUDIENCE, keys.a_jwks),
            TrustedIssuer(ISSUER_B, AUDIENCE, keys.b_jwks),
        ],
        leeway=30,
        clock=clock,
    )


def sign(key_path: Path, claims: dict[str, Any], **header: Any) -> str:
    key, kid, alg = load_private_key(key_path)
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **header})


def kid_of(key_path: Path) -> str:
    return load_private_key(key_path)[1]


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_keygen_issue_verify_round_trip(
    tmp_path: Path, algorithm: Literal["EdDSA", "ES256"]
) -> None:
    """A token issued with a generated key verifies to the platform identity it names."""
    key_path, jwks_path = generate_keypair(tmp_path, "platform", algorithm)
    token = issue_token(
        key_path,
        issuer=ISSUER_A,
        audience=AUDIENCE,
        task="task-7",
        tenant="acme",
        app="web",
        ttl=600,
        now=NOW,
    )
    verifier = IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, jwks_path)], clock=clock_at(NOW))
    identity = verifier.verify(token)
    assert jwt.get_unverified_header(token) == {
        "alg": algorithm,
        "kid": kid_of(key_path),
        "typ": "JWT",
    }
    assert (identity.kind, identity.issuer, identity.subject) == (
        "platform",
        ISSUER_A,
        "task:acme/task-7",
    )
    assert (identity.task, identity.tenant, identity.app) == ("task-7", "acme", "web")
    assert identity.expires_at == NOW + 600
    assert identity.token_id == jwt.decode(token, options={"verify_signature": False})["jti"]


def test_expired_within_leeway_is_accepted(
    verifier: IdentityVerifier, keys: Keys, clock: ManualClock
) -> None:
    """A token that expired less than the leeway ago still verifies (clock skew)."""
    token = sign(keys.a_key, platform_claims(exp=int(NOW) + 60))
    clock.moment = datetime.fromtimestamp(NOW + 60 + 29, UTC)
    assert verifier.verify(token).task == "task-1"
    clock.moment = datetime.fromtimestamp(NOW + 60 + 31, UTC)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)


TokenFactory = Callable[[Keys], str]


def alg_none(keys: Keys) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(platform_claims()).encode())}."


def hs256_with_public_key(keys: Keys) -> str:
    # The classic confusion: use the verifier's public key bytes as an HMAC secret.
    public_pem = (
        load_private_key(keys.a_key)[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid_of(keys.a_key)}).encode())
    payload = b64(json.dumps(platform_claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def jws_json_serialisation(keys: Keys) -> str:
    header, payload, signature = sign(keys.a_key, platform_claims()).split(".")
    return json.dumps({"protected": header, "payload": payload, "signature": signature})


REJECTED: list[Any] = [
    pytest.param(alg_none, "alg none", id="alg-none"),
    pytest.param(hs256_with_public_key, "symmetric alg HS256", id="hs256-public-key-as-secret"),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(exp=None)),
        "missing required claim exp",
        id="missing-exp",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(exp=int(NOW) - 31, iat=int(NOW) - 600)),
        "expired",
        id="expired-beyond-leeway",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(aud="someone-else")), "aud", id="wrong-aud"
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(iss="https://evil.example")),
        "untrusted issuer",
        id="wrong-iss",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(aud=[AUDIENCE, "other-service"])),
        "several audiences",
        id="several-audiences",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(), kid="no-such-kid"),
        "unknown kid",
        id="unknown-kid",
    ),
    pytest.param(jws_json_serialisation, "JWS JSON", id="jws-json-serialisation"),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(), crit=["exp"]), "crit", id="crit-header"
    ),
    pytest.param(
        lambda k: sign(k.impostor_key, platform_claims(), kid=kid_of(k.a_key)),
        "signature verification failed",
        id="forged-signature-same-kid",
    ),
    pytest.param(
        lambda k: sign(k.b_key, platform_claims(iss=ISSUER_A)),
        "unknown kid",
        id="issuer-a-signed-by-issuer-b",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(iat=int(NOW) + 600)), "iat", id="issued-in-future"
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(nbf=int(NOW) + 600)), "nbf", id="not-yet-valid"
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(sub="task:other/task-1")),
        "sub",
        id="sub-disagrees-with-claims",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(exp=float("nan"))),
        "exp is not a finite number",
        id="nan-exp",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(task=123)),
        "claim task must be a non-empty string",
        id="non-string-task",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(task="t" * 257)),
        "longer than 256",
        id="overlong-claim",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(exp=int(NOW) + 2 * 86_400)),
        "lifetime",
        id="platform-token-lifetime-over-a-day",
    ),
    pytest.param(
        lambda k: sign(k.a_key, platform_claims(), jku="https://evil.example/jwks"),
        "jku",
        id="jku-header",
    ),
    pytest.param(lambda k: "", "empty", id="garbage-empty"),
    pytest.param(lambda k: "a" * 9000, "longer than", id="garbage-huge"),
    pytest.param(lambda k: "éé.éé.éé", "not ASCII", id="garbage-non-ascii"),
    pytest.param(lambda k: "a.b.c.d", "two dots", id="garbage-three-dots"),
    pytest.param(lambda k: "abc", "two dots", id="garbage-no-dots"),
    pytest.param(lambda k: "!!.??.**", "base64url", id="garbage-not-base64url"),
]


@pytest.mark.parametrize(("make_token", "reason"), REJECTED)
def test_rejected_tokens(
    verifier: IdentityVerifier, keys: Keys, make_token: TokenFactory, reason: str
) -> None:
    """Each forged, stale or malformed token is refused with a reason that names the check."""
    token = make_token(keys)
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    detail = caught.value.detail
    assert reason in detail
    assert caught.value.status == 401
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in detail
            assert part not in str(caught.value)


def test_alg_must_match_the_key_type_of_the_kid(keys: Keys) -> None:
    """An ES256 header on an Ed25519 kid is refused before pyjwt sees it."""
    claims = platform_claims()
    _, kid, _ = load_private_key(keys.a_key)
    es_dir = keys.a_key.parent.parent / "es"
    es_key, _ = generate_keypair(es_dir, "identity", "ES256")
    token = sign(es_key, claims, kid=kid)
    verifier = IdentityVerifier(
        [TrustedIssuer(ISSUER_A, AUDIENCE, keys.a_jwks)], clock=clock_at(NOW)
    )
    with pytest.raises(Unauthenticated, match="pinned EdDSA"):
        verifier.verify(token)


def test_token_without_kid_uses_the_only_key(verifier: IdentityVerifier, keys: Keys) -> None:
    """With a single key in the issuer's JWKS, a token without kid verifies against it."""
    key, _, alg = load_private_key(keys.a_key)
    token = jwt.encode(platform_claims(), key, algorithm=alg)
    assert verifier.verify(token).tenant == "acme"


# -- Kubernetes projected service-account tokens -------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_rsa_jwks(path: Path, key: rsa.RSAPrivateKey) -> str:
    jwk: dict[str, str] = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}))
    return kid


def k8s_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "aud": [AUDIENCE],
        "exp": int(NOW) + 3600,
        "iat": int(NOW),
        "nbf": int(NOW),
        "iss": K8S_ISSUER,
        "jti": "5b5b6a4e-0d0b-4f8e-9a57-3e3c8b1f2a10",
        "kubernetes.io": {
            "namespace": "team-a",
            "node": {"name": "node-1", "uid": "0f6a3c1e-4d2b-4e7f-9a8b-1c2d3e4f5a6b"},
            "pod": {"name": "web-7d9f8-abcde", "uid": "8e1f2a3b-4c5d-6e7f-8a9b-0c1d2e3f4a5b"},
            "serviceaccount": {"name": "web", "uid": "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"},
            "warnafter": int(NOW) + 3000,
        },
        "sub": "system:serviceaccount:team-a:web",
    }
    claims.update(overrides)
    return claims


@pytest.fixture
def k8s_verifier(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> tuple[IdentityVerifier, str]:
    jwks = tmp_path / "k8s.jwks.json"
    kid = write_rsa_jwks(jwks, rsa_key)
    trust = TrustedIssuer(K8S_ISSUER, AUDIENCE, jwks, "kubernetes")
    return IdentityVerifier([trust], clock=clock_at(NOW)), kid


def test_kubernetes_token_verifies_to_kubernetes_identity(
    k8s_verifier: tuple[IdentityVerifier, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    """An RS256 projected service-account token maps to namespace, service account and pod."""
    verifier, kid = k8s_verifier
    token = jwt.encode(k8s_claims(), rsa_key, algorithm="RS256", headers={"kid": kid})
    identity = verifier.verify(token)
    assert identity.kind == "kubernetes"
    assert identity.issuer == K8S_ISSUER
    assert identity.subject == "system:serviceaccount:team-a:web"
    assert (identity.namespace, identity.service_account) == ("team-a", "web")
    pod = "web-7d9f8-abcde.8e1f2a3b-4c5d-6e7f-8a9b-0c1d2e3f4a5b"  # a reused name has a new UID
    assert (identity.task, identity.app, identity.tenant) == (pod, "web", "")
    assert identity.token_id == "5b5b6a4e-0d0b-4f8e-9a57-3e3c8b1f2a10"
    assert identity.expires_at == NOW + 3600


def test_kubernetes_token_without_pod_uses_service_account(
    k8s_verifier: tuple[IdentityVerifier, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    """A token not bound to a pod names the service account as its task."""
    verifier, kid = k8s_verifier
    claims = k8s_claims()
    del claims["kubernetes.io"]["pod"]
    token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": kid})
    assert verifier.verify(token).task == "web"


def test_kubernetes_token_with_mismatched_sub_is_rejected(
    k8s_verifier: tuple[IdentityVerifier, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    """A sub naming another service account than the kubernetes.io claims is refused."""
    verifier, kid = k8s_verifier
    claims = k8s_claims(sub="system:serviceaccount:kube-system:admin")
    token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(Unauthenticated, match="sub does not match"):
        verifier.verify(token)


def test_rs256_key_is_not_trusted_for_platform_issuers(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """RS256 is pinned to kubernetes issuers; a platform issuer with an RSA key refuses it."""
    jwks = tmp_path / "rsa.jwks.json"
    kid = write_rsa_jwks(jwks, rsa_key)
    verifier = IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, jwks)], clock=clock_at(NOW))
    token = jwt.encode(platform_claims(), rsa_key, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(Unauthenticated, match="only from kubernetes issuers"):
        verifier.verify(token)


# -- key rotation ---------------------------------------------------------------------------


def test_jwks_rotation_is_picked_up_without_a_new_verifier(tmp_path: Path) -> None:
    """Replacing the JWKS file makes new keys valid and retired keys invalid, no restart."""
    old_key, jwks = generate_keypair(tmp_path, "rot", "EdDSA")
    verifier = IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, jwks)], clock=clock_at(NOW))
    old_token = sign(old_key, platform_claims())
    assert verifier.verify(old_token).task == "task-1"

    new_key, same_jwks = generate_keypair(tmp_path, "rot", "ES256")
    assert same_jwks == jwks
    new_token = sign(new_key, platform_claims(task="task-2", sub="task:acme/task-2"))
    assert verifier.verify(new_token).task == "task-2"
    with pytest.raises(Unauthenticated, match="unknown kid"):
        verifier.verify(old_token)


def test_broken_jwks_replacement_keeps_last_good_keys(tmp_path: Path) -> None:
    """A JWKS replaced with garbage is ignored; tokens keep verifying with the previous keys."""
    key, jwks = generate_keypair(tmp_path, "rot", "EdDSA")
    verifier = IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, jwks)], clock=clock_at(NOW))
    token = sign(key, platform_claims())
    jwks.unlink()
    jwks.write_text('{"keys": "not a list"}')
    assert verifier.verify(token).tenant == "acme"


def test_token_without_kid_is_refused_when_issuer_has_several_keys(tmp_path: Path) -> None:
    """With several keys published, a token must say which one signed it."""
    key, jwks = generate_keypair(tmp_path / "one", "k", "EdDSA")
    _, second = generate_keypair(tmp_path / "two", "k", "ES256")
    both = json.loads(jwks.read_text())["keys"] + json.loads(second.read_text())["keys"]
    jwks.write_text(json.dumps({"keys": both}))
    verifier = IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, jwks)], clock=clock_at(NOW))
    private, _, alg = load_private_key(key)
    assert verifier.verify(sign(key, platform_claims())).task == "task-1"
    with pytest.raises(Unauthenticated, match="no kid"):
        verifier.verify(jwt.encode(platform_claims(), private, algorithm=alg))


def test_verifier_refuses_bad_configuration(tmp_path: Path, keys: Keys) -> None:
    """A missing JWKS or an issuer trusted twice stops the verifier from being built."""
    with pytest.raises(ConfigError, match="cannot read JWKS"):
        IdentityVerifier([TrustedIssuer(ISSUER_A, AUDIENCE, tmp_path / "missing.json")])
    twice = [TrustedIssuer(ISSUER_A, AUDIENCE, keys.a_jwks)] * 2
    with pytest.raises(ConfigError, match="trusted twice"):
        IdentityVerifier(twice)
