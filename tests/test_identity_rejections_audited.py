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
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.broker.server import BrokerServer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.identity.jwks import load_jwks
from metaproxy.identity.keys import load_private_key
from tests.support import Pki, audit_records, issue


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


def deeply_nested(where: str) -> Callable[[Pki], str]:
    """1,500 nested arrays in the header or payload: json's recursion limit, under 8 KB."""
    deep = b"[" * 1500 + b"]" * 1500

    def make(pki: Pki) -> str:
        header, payload, signature = signed(pki, claims()).split(".")
        if where == "header":
            header = b64(b'{"alg": "EdDSA", "typ": "JWT", "x": ' + deep + b"}")
        else:
            payload = b64(b'{"iss": "x", "x": ' + deep + b"}")
        return f"{header}.{payload}.{signature}"

    return make


def non_canonical_signature(pki: Pki) -> str:
    """The same signature bytes spelled with unused bits set in its last character."""
    token = signed(pki, claims())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    assert len(token.rsplit(".", 1)[1]) % 4 == 2  # 64 bytes: the last character carries 4 bits
    return token[:-1] + alphabet[last | 0b0101]


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
    "deeply-nested-header": deeply_nested("header"),
    "deeply-nested-payload": deeply_nested("payload"),
    "non-canonical-signature": non_canonical_signature,
    "not-yet-valid": lambda pki: signed(pki, claims(nbf=int(time.time()) + 600)),
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
    "deeply-nested-header": "nested too deeply",
    "deeply-nested-payload": "nested too deeply",
    "non-canonical-signature": "not base64url",
    "not-yet-valid": "not yet valid",
}

# The category the 401's body carries: what the task may be told about its own token.
CATEGORIES = {
    "alg-none": "bad_signature",
    "hs256-signed-with-public-key": "bad_signature",
    "missing-exp": "invalid_claims",
    "expired-beyond-leeway": "expired",
    "wrong-audience": "wrong_audience",
    "wrong-issuer": "unknown_issuer",
    "several-audiences": "wrong_audience",
    "unknown-kid": "bad_signature",
    "jws-json-serialisation": "malformed",
    "unknown-crit-header": "malformed",
    "deeply-nested-header": "malformed",
    "deeply-nested-payload": "malformed",
    "non-canonical-signature": "malformed",
    "not-yet-valid": "not_yet_valid",
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
    assert body["reason"] == CATEGORIES[kind]
    records = [
        r for r in audit_records(tmp_path / "audit") if r["request_id"] == body["request_id"]
    ]
    assert [(r["event"], r["status"]) for r in records] == [("denied", 401)]
    assert token not in json.dumps(records)
    assert REASONS[kind] in records[0]["reason"]  # refused by the check under test


async def test_no_token_is_401_with_reason_missing(
    broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """No Authorization header: 401 whose reason says the token is missing."""
    async with https.post(broker.url + "/v1/credentials", json={}) as response:
        assert response.status == 401
        assert (await response.json())["reason"] == "missing"


def test_every_canonical_token_has_exactly_one_spelling(pki: Pki) -> None:
    """Of the 64 last characters only 4 decode (one per value of its 2 meaningful bits)."""
    from metaproxy.identity.keys import b64url_decode

    token = signed(pki, claims())
    signature = token.rsplit(".", 1)[1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    decoded = []
    for char in alphabet:
        try:
            decoded.append(b64url_decode(signature[:-1] + char))
        except ValueError:
            continue
    assert len(decoded) == 4  # one per value of the last character's 2 meaningful bits
    assert b64url_decode(signature) in decoded


async def test_a_good_token_still_works_after_the_rejections(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """The control: the same key, claims and path with nothing wrong is a 200."""
    for token in (signed(pki, claims()), issue(pki, "t-1", "acme")):
        async with https.post(
            broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("claim", "value"),
    [("task", "victim/config"), ("task", "a:b"), ("tenant", "acme*"), ("app", "web/../x")],
)
async def test_claims_meaningful_in_arns_are_401(
    claim: str, value: str, broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """A task `victim/config` would be scoped inside the victim's S3 prefix: refused, 401."""
    body = claims(**{claim: value})
    body["sub"] = f"task:{body['tenant']}/{body['task']}"
    async with https.post(
        broker.url + "/v1/credentials",
        json={},
        headers={"Authorization": f"Bearer {signed(pki, body)}"},
    ) as response:
        assert response.status == 401
        assert (await response.json())["reason"] == "invalid_claims"


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_an_accepted_name_never_holds_a_path_or_arn_character(value: str) -> None:
    """Over arbitrary Unicode: an accepted name is ASCII without / : * ? $ { } or spaces, so no
    name can land inside another's prefix."""
    from metaproxy.identity.names import name_problem

    if name_problem(value) is None:
        assert value.isascii()
        assert not set(value) & set("/:*?${}\\ \t\n#%&\"'<>|~`^!;()[]")
        assert value[0].isalnum()
        for other in ("victim", "acme-data"):
            assert not value.startswith(other + "/")


@given(st.text(min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_issue_refuses_what_the_broker_would_refuse(value: str) -> None:
    """`metaproxy identity issue` and the verifier apply the same rule to task names."""
    from metaproxy.errors import BadRequest, ConfigError
    from metaproxy.identity.issue import issue_token
    from metaproxy.identity.names import name_problem

    try:
        issue_token(Path("/nonexistent"), issuer="i", audience="a", task=value, tenant="acme")
    except BadRequest:
        assert name_problem(value) is not None or not value.isprintable()
    except (ConfigError, OSError):
        assert name_problem(value) is None  # got as far as reading the key
