"""Signing keys, JWKS files and token issuance: what is written, and which inputs are refused."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest

from metaproxy.errors import BadRequest, ConfigError
from metaproxy.identity.issue import issue_token
from metaproxy.identity.jwks import load_jwks
from metaproxy.identity.keys import generate_keypair, jwk_thumbprint, load_private_key, public_jwk

RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPeb"
    "WKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368Q"
    "QMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2N"
    "cRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)


def test_thumbprint_matches_rfc7638_example() -> None:
    """The kid is the RFC 7638 thumbprint (the RFC's own RSA example, section 3.1)."""
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(
    ("algorithm", "kty", "crv", "members"),
    [("EdDSA", "OKP", "Ed25519", {"x"}), ("ES256", "EC", "P-256", {"x", "y"})],
)
def test_generate_keypair_writes_private_key_and_jwks(
    tmp_path: Path,
    algorithm: Literal["EdDSA", "ES256"],
    kty: str,
    crv: str,
    members: set[str],
) -> None:
    """keygen writes a 0600 PKCS8 key and a one-key JWKS whose kid is the key's thumbprint."""
    key_path, jwks_path = generate_keypair(tmp_path / "keys", "platform", algorithm)
    assert key_path == tmp_path / "keys" / "platform.key"
    assert jwks_path == tmp_path / "keys" / "platform.jwks.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    (jwk,) = json.loads(jwks_path.read_text())["keys"]
    assert set(jwk) == {"kty", "crv", "kid", "alg", "use"} | members
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == (kty, crv, algorithm, "sig")
    key, kid, alg = load_private_key(key_path)
    assert (kid, alg) == (jwk["kid"], algorithm)
    assert kid == jwk_thumbprint(public_jwk(key.public_key()))
    assert list(load_jwks(jwks_path)) == [kid]
    assert not list(tmp_path.joinpath("keys").glob(".*")), "no temporary files left behind"


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def valid_jwk(tmp_path: Path) -> dict[str, Any]:
    _, jwks = generate_keypair(tmp_path / "src", "k", "ES256")
    jwk: dict[str, Any] = json.loads(jwks.read_text())["keys"][0]
    return jwk


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(lambda jwk: "not json", "not valid JSON", id="not-json"),
        pytest.param(lambda jwk: {"keys": jwk}, "'keys' list", id="keys-not-a-list"),
        pytest.param(lambda jwk: {"keys": []}, "between 1 and", id="no-keys"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "d": "AAAA"}]}, "private", id="private-member"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "alg": "HS256"}]}, "alg", id="wrong-alg"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "use": "enc"}]}, "use", id="wrong-use"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "crv": "P-384"}]}, "P-256", id="wrong-curve"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "kty": "oct"}]}, "kty", id="symmetric-kty"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "x": "!!"}]}, "base64url", id="bad-base64"),
        pytest.param(lambda jwk: {"keys": [{**jwk, "y": jwk["x"]}]}, "not a valid", id="off-curve"),
        pytest.param(lambda jwk: {"keys": [jwk, jwk]}, "duplicate kid", id="duplicate-kid"),
        pytest.param(
            lambda jwk: {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]},
            "2048",
            id="short-rsa",
        ),
    ],
)
def test_load_jwks_refuses_malformed_files(tmp_path: Path, mutate: Any, message: str) -> None:
    """A JWKS that is malformed, holds secrets or mismatched algorithms is refused."""
    path = write(tmp_path, mutate(valid_jwk(tmp_path)))
    with pytest.raises(ConfigError, match=message):
        load_jwks(path)


def test_load_jwks_accepts_rfc7638_rsa_key(tmp_path: Path) -> None:
    """RSA keys (as Kubernetes publishes them) load, pinned to RS256."""
    path = write(tmp_path, {"keys": [{"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "kid": "k8s"}]})
    ((kid, (_, alg)),) = load_jwks(path).items()
    assert (kid, alg) == ("k8s", "RS256")


def test_issue_token_claims(tmp_path: Path) -> None:
    """An issued token carries exactly the documented claims, with a single-string aud."""
    key_path, _ = generate_keypair(tmp_path)
    token = issue_token(
        key_path, issuer="iss", audience="aud", task="t-1", tenant="acme", ttl=120, now=1000.5
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.pop("jti")
    assert isinstance(jti, str)
    assert len(jti) >= 16
    assert claims == {
        "iss": "iss",
        "aud": "aud",
        "sub": "task:acme/t-1",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1120,
        "task": "t-1",
        "tenant": "acme",
        "app": "",
    }
    other = issue_token(key_path, issuer="iss", audience="aud", task="t-1", tenant="acme")
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != jti


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"task": ""}, "task must not be empty", id="empty-task"),
        pytest.param({"tenant": ""}, "tenant must not be empty", id="empty-tenant"),
        pytest.param({"task": "x" * 257}, "at most 256", id="long-task"),
        pytest.param({"tenant": "a\nb"}, "printable", id="unprintable-tenant"),
        pytest.param({"app": "\x00"}, "printable", id="unprintable-app"),
        pytest.param({"tenant": "a/b"}, "hold only A-Z", id="slash-in-tenant"),
        pytest.param({"ttl": 59}, "between 60 and 86400", id="ttl-too-short"),
        pytest.param({"ttl": 86_401}, "between 60 and 86400", id="ttl-too-long"),
        pytest.param({"ttl": True}, "integer", id="ttl-bool"),
        pytest.param({"issuer": ""}, "issuer must not be empty", id="empty-issuer"),
    ],
)
def test_issue_token_validates_inputs(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    """Invalid task, tenant, app or ttl is refused before anything is signed."""
    key_path, _ = generate_keypair(tmp_path)
    arguments: dict[str, Any] = {
        "issuer": "iss",
        "audience": "aud",
        "task": "t-1",
        "tenant": "acme",
        **overrides,
    }
    with pytest.raises(BadRequest, match=message):
        issue_token(key_path, **arguments)


def test_load_private_key_error_does_not_quote_the_file(tmp_path: Path) -> None:
    """An unreadable key file is reported by name, never by content."""
    path = tmp_path / "bad.key"
    path.write_text(
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LW1hdGVyaWFs\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_private_key(path)
    assert "c2VjcmV0" not in caught.value.detail
    assert str(path) in caught.value.detail
