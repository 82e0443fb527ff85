"""Reading a JWKS (a file, or a document fetched from the issuer): the public keys an issuer
publishes, each pinned to its one algorithm.

Only Ed25519, P-256 and RSA keys of at least 2048 bits are accepted, RSA only because
Kubernetes signs service-account tokens with RS256. A file holding private key material, an
`alg` that does not fit its key, or anything malformed is refused with one line naming the file
and the key, never with the file's content.

SPIRE's bundle endpoint is a JWKS too, with `use` naming what each key is for: `jwt-svid` keys
verify tokens like `sig` ones; `x509-svid` entries are CA certificates for mTLS, skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from metaproxy.errors import ConfigError
from metaproxy.identity.keys import (
    PublicKey,
    VerifyingAlgorithm,
    b64url_decode,
    jwk_thumbprint,
    public_jwk,
)

# A JWKS is tiny; anything bigger is a misconfiguration (or someone pointing us at the wrong file).
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
MIN_RSA_BITS = 2048
# Members that only a private JWK carries; a published JWKS holding them leaks the signing key.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
SIGNING_USES = frozenset({"sig", "jwt-svid"})
SKIPPED_USES = frozenset({"x509-svid"})  # not a token-signing key (SPIFFE bundle format)


def algorithm_for(key: PublicKey) -> VerifyingAlgorithm:
    """The one algorithm each key type may be used with (pinning defeats algorithm confusion)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    return "RS256"


def _member(jwk: Mapping[str, Any], name: str, where: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: member {name!r} must be a non-empty string")
    return value


def _decode_member(jwk: Mapping[str, Any], name: str, where: str) -> bytes:
    try:
        return b64url_decode(_member(jwk, name, where))
    except ValueError:
        raise ConfigError(f"{where}: member {name!r} is not base64url") from None


def jwk_to_public_key(jwk: Mapping[str, Any], where: str = "jwk") -> PublicKey:
    """Build a public key from a JWK, accepting only Ed25519, P-256 and RSA (>= 2048 bits)."""
    kty = _member(jwk, "kty", where)
    key: PublicKey
    try:
        if kty == "OKP":
            if _member(jwk, "crv", where) != "Ed25519":
                raise ConfigError(f"{where}: OKP keys must use crv Ed25519")
            key = ed25519.Ed25519PublicKey.from_public_bytes(_decode_member(jwk, "x", where))
        elif kty == "EC":
            if _member(jwk, "crv", where) != "P-256":
                raise ConfigError(f"{where}: EC keys must use crv P-256")
            x, y = _decode_member(jwk, "x", where), _decode_member(jwk, "y", where)
            if len(x) != 32 or len(y) != 32:
                raise ConfigError(f"{where}: P-256 coordinates must be 32 bytes")
            point = b"\x04" + x + y  # uncompressed point; cryptography checks it is on the curve
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        elif kty == "RSA":
            n = int.from_bytes(_decode_member(jwk, "n", where), "big")
            e = int.from_bytes(_decode_member(jwk, "e", where), "big")
            if n.bit_length() < MIN_RSA_BITS:
                raise ConfigError(f"{where}: RSA keys must have at least {MIN_RSA_BITS} bits")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        else:
            raise ConfigError(f"{where}: kty {kty!r} is not supported")
    except ValueError:
        raise ConfigError(f"{where}: not a valid {kty} public key") from None
    return key


def load_jwks(path: Path) -> dict[str, tuple[PublicKey, VerifyingAlgorithm]]:
    """Public keys by kid, each with the one algorithm it may verify. Refuses malformed files."""
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read JWKS {where}: {exc.strerror}") from None
    return parse_jwks(raw, where)


def parse_jwks(raw: bytes, where: str) -> dict[str, tuple[PublicKey, VerifyingAlgorithm]]:
    """The keys of a JWKS document read from `where` (a file or a URL, for the messages)."""
    if len(raw) > MAX_JWKS_BYTES:
        raise ConfigError(f"JWKS {where} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"JWKS {where} is not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ConfigError(f"JWKS {where} must be an object with a 'keys' list")
    entries: list[Any] = document["keys"]
    if not 1 <= len(entries) <= MAX_JWKS_KEYS:
        raise ConfigError(f"JWKS {where} must hold between 1 and {MAX_JWKS_KEYS} keys")
    keys: dict[str, tuple[PublicKey, VerifyingAlgorithm]] = {}
    for index, jwk in enumerate(entries):
        at = f"JWKS {where} key {index}"
        if not isinstance(jwk, dict):
            raise ConfigError(f"{at}: must be an object")
        if jwk.get("use") in SKIPPED_USES:
            continue
        kid, key, alg = _signing_key(jwk, at)
        if kid in keys:
            raise ConfigError(f"{at}: duplicate kid {kid!r}")
        keys[kid] = (key, alg)
    if not keys:
        raise ConfigError(f"JWKS {where} holds no token-signing key")
    return keys


def _signing_key(jwk: Mapping[str, Any], at: str) -> tuple[str, PublicKey, VerifyingAlgorithm]:
    """One entry's kid, key and pinned algorithm, or ConfigError naming the entry."""
    if PRIVATE_JWK_MEMBERS & jwk.keys():
        raise ConfigError(f"{at}: holds private or symmetric key material; publish public keys")
    key = jwk_to_public_key(jwk, at)
    alg = algorithm_for(key)
    if "alg" in jwk and jwk["alg"] != alg:
        raise ConfigError(f"{at}: alg {jwk['alg']!r} does not fit the key type (expected {alg})")
    if "use" in jwk and jwk["use"] not in SIGNING_USES:
        raise ConfigError(f"{at}: use must be 'sig' (or SPIFFE's 'jwt-svid')")
    kid = jwk.get("kid", jwk_thumbprint(public_jwk(key)))
    if not isinstance(kid, str) or not kid or len(kid) > 256 or not kid.isprintable():
        raise ConfigError(f"{at}: kid must be a printable string of at most 256 characters")
    return kid, key, alg
