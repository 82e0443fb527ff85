"""An identity token's outer shape: the JWS compact serialisation, its header, its signature.

Every check that can be made on the structure and the header is made before any signature
verification, and the algorithm is never taken from the token: the caller pins it by the type
of the key the `kid` names (`trusted_keys.py`), which defeats `alg: none`,
HS256-with-the-public-key and similar algorithm-confusion attacks. Rejections raise
`Unauthenticated` naming the failed check, never the token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jwt

from metaproxy.errors import Unauthenticated
from metaproxy.identity.keys import PublicKey, VerifyingAlgorithm, b64url_decode

MAX_TOKEN_BYTES = 8 * 1024
# pyjwt's implementations of the algorithms a key can be pinned to.
_ALGORITHMS = {alg: jwt.get_algorithm_by_name(alg) for alg in ("EdDSA", "ES256", "RS256")}
# Headers that make the token name its own key, change how the payload is read, or mark JWE.
FORBIDDEN_HEADERS = ("crit", "jwk", "jku", "x5u", "x5c", "b64", "enc", "zip")


def parse(token: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and the (not yet verified) payload of a compact JWS."""
    if not isinstance(token, str) or not token:
        raise Unauthenticated("malformed token: empty", reason="malformed")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(
            f"malformed token: longer than {MAX_TOKEN_BYTES} bytes", reason="malformed"
        )
    if not token.isascii():
        raise Unauthenticated("malformed token: not ASCII", reason="malformed")
    if token.lstrip().startswith("{"):
        raise Unauthenticated(
            "malformed token: JWS JSON serialisation is not accepted", reason="malformed"
        )
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated(
            "malformed token: compact serialisation needs exactly two dots", reason="malformed"
        )
    header = _decode_json_part(parts[0], "header")
    try:
        b64url_decode(parts[2])
    except ValueError:
        raise Unauthenticated(
            "malformed token: signature is not base64url", reason="malformed"
        ) from None
    payload = _decode_json_part(parts[1], "payload")
    return header, payload


def check_header(header: Mapping[str, Any]) -> None:
    for name in FORBIDDEN_HEADERS:
        if name in header:
            raise Unauthenticated(f"header {name!r} is not accepted", reason="malformed")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise Unauthenticated("header alg is missing", reason="malformed")
    if alg.lower() == "none":
        raise Unauthenticated("alg none is not accepted", reason="bad_signature")
    if alg.upper().startswith("HS"):
        raise Unauthenticated(f"symmetric alg {alg} is not accepted", reason="bad_signature")
    if alg not in ("EdDSA", "ES256", "RS256"):
        raise Unauthenticated(f"alg {alg[:16]!r} is not supported", reason="bad_signature")
    if "typ" in header and header["typ"] not in ("JWT", "jwt"):
        raise Unauthenticated("header typ must be JWT", reason="malformed")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > 256):
        raise Unauthenticated("header kid must be a non-empty string", reason="malformed")


def check_signature(token: str, key: PublicKey, alg: VerifyingAlgorithm) -> None:
    """Verify with pyjwt's implementation of the pinned algorithm. Not jwt.decode: it would
    parse the token a second time, with a per-character base64 check in Python, a third of the
    broker's CPU for a refused request during a burst."""
    signing_input, _, signature = token.rpartition(".")
    if not signature:
        raise Unauthenticated("malformed token: empty signature", reason="malformed")
    try:
        valid = _ALGORITHMS[alg].verify(signing_input.encode(), key, b64url_decode(signature))
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise Unauthenticated("signature verification failed", reason="bad_signature")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError("duplicate member")
        result[name] = value
    return result


def _decode_json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part), object_pairs_hook=_reject_duplicates)
    except ValueError:  # covers base64, UTF-8 and JSON errors, and duplicate members
        raise Unauthenticated(
            f"malformed token: {what} is not base64url JSON", reason="malformed"
        ) from None
    except RecursionError:
        # `[[[[…` a few thousand deep fits in 8 KB and exhausts json's recursion: before this
        # it escaped as a pre-auth 500 with a traceback and no audit record.
        raise Unauthenticated(
            f"malformed token: {what} is nested too deeply", reason="malformed"
        ) from None
    if not isinstance(value, dict):
        raise Unauthenticated(f"malformed token: {what} is not a JSON object", reason="malformed")
    return value
