"""Every way an identity token can be wrong is a 401 at the broker, audited exactly once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from metaproxy.broker.server import BrokerServer
from metaproxy.identity.keys import load_jwks, load_private_key
from tests.support import AUDIENCE, ISSUER, Pki, audit_records, issue


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def part(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "task:acme/t-1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "jti-1",
        "task": "t-1",
        "tenant": "acme",
        "app": "web",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(pki: Pki, body: dict[str, Any], **headers: Any) -> str:
    """Signed with the trusted key: only the claim or header under test is wrong."""
    key, kid, alg = load_private_key(pki.identity_key)
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid, "typ": "JWT", **headers})


def hs256_with_public_key(pki: Pki) -> str:
    """The classic confusion attack: HMAC keyed with the verifier's public key."""
    ((kid, (public_key, _alg)),) = load_jwks(pki.jwks).items()
    secret = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{part(claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def json_serialisation(pki: Pki) -> str:
    compact = signed(pki, claims())
    protected, payload, signature = compact.split(".")
    return json.dumps({"payload": payload, "protected": protected, "signature": signature})


def alg_none(pki: Pki) -> str:
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims())}."


TOKENS: dict[str, Callable[[Pki], str]] = {
    "alg-none": alg_none,
    "hs256-signed-with-public-key": hs256_with_public_key,
    "missing-exp": lambda pki: signed(pki, claims(exp=None)),
    "expired-beyond-leeway": lambda pki: signed(
        pki,
        claims(iat=int(time.time()) - 700, nbf=int(time.time()) - 700, exp=int(time.time()) - 31),
    ),
    "wrong-audience": lambda pki: signed(pki, claims(aud="someone-else")),
    "wrong-issuer": lambda pki: signed(pki, claims(iss="evil-platform")),
    "several-audiences": lambda pki: signed(pki, claims(aud=[AUDIENCE, "someone-else"])),
    "unknown-kid": lambda pki: signed(pki, claims(), kid="not-a-known-kid"),
    "jws-json-serialisation": json_serialisation,
    "unknown-crit-header": lambda pki: signed(
        pki, claims(), crit=["exp-policy"], **{"exp-policy": 1}
    ),
}


# What the audit record says: proves each token failed the check it was built to fail.
REASONS = {
    "alg-none": "alg none",
    "hs256-signed-with-public-key": "symmetric alg HS256",
    "missing-exp": "claim exp",
    "expired-beyond-leeway": "expired",
    "wrong-audience": "audience",
    "wrong-issuer": "issuer",
    "several-audiences": "several audiences",
    "unknown-kid": "unknown kid",
    "jws-json-serialisation": "JWS JSON",
    "unknown-crit-header": "crit",
}


@pytest.mark.parametrize("kind", list(TOKENS))
async def test_rejected_identity_is_401_and_audited_once(
    kind: str, broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """The token is refused with 401, one `denied` 401 record per request id, token not echoed."""
    token = TOKENS[kind](pki)
    async with https.post(
        broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 401
        body = await response.json()
    assert body["code"] == "Unauthenticated"
    records = [
        r for r in audit_records(tmp_path / "audit") if r["request_id"] == body["request_id"]
    ]
    assert [(r["event"], r["status"]) for r in records] == [("denied", 401)]
    assert token not in json.dumps(records)
    assert REASONS[kind] in records[0]["reason"]  # refused by the check under test


async def test_a_good_token_still_works_after_the_rejections(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """The control: the same key, claims and path with nothing wrong is a 200."""
    for token in (signed(pki, claims()), issue(pki, "t-1", "acme")):
        async with https.post(
            broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200
