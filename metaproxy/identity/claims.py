"""An identity token's claims: checked for shape, size, issuer, audience and time.

Claims are small (strings of at most 256 characters, finite numbers, shallow nests) because
they reach policies, ARNs and audit records. Only a single audience is accepted, and a platform
token lives at most a day. Rejections raise `Unauthenticated` naming the failed claim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from metaproxy.config import TrustedIssuer
from metaproxy.errors import Unauthenticated
from metaproxy.identity.names import name_problem

MAX_CLAIM_CHARS = 256
MAX_CLAIM_DEPTH = 4
MAX_LIST_ITEMS = 16
# Platform tokens live at most a day (issue.py enforces it); a longer one was not minted by us.
MAX_PLATFORM_LIFETIME = 86_400


def check_claims(
    claims: Mapping[str, Any], trust: TrustedIssuer, *, now: float, leeway: float
) -> None:
    """The registered claims are there and match `trust`; every value is small; the token is
    within its lifetime (with `leeway` seconds either side)."""
    # A JWT-SVID names its issuer by its `sub`'s trust domain (`spiffe.py`); `iss` is optional.
    spiffe = trust.kind == "spiffe"
    for name in ("exp", "iat", "aud") if spiffe else ("exp", "iat", "iss", "aud"):
        if name not in claims:
            raise Unauthenticated(f"missing required claim {name}", reason="invalid_claims")
    if not spiffe and claims["iss"] != trust.issuer:
        raise Unauthenticated("issuer (iss) does not match", reason="unknown_issuer")
    for name, value in claims.items():
        _check_value(name, value)
    audience = claims["aud"]
    # A token meant for several services could be replayed by any of them: only a single
    # audience is accepted (as a string, or a list of one).
    if isinstance(audience, list):
        if len(audience) != 1:
            raise Unauthenticated(
                "several audiences (aud) are not accepted", reason="wrong_audience"
            )
        audience = audience[0]
    if audience != trust.audience:
        raise Unauthenticated("audience (aud) does not match", reason="wrong_audience")
    _check_times(claims, trust, now, leeway)


def _check_times(
    claims: Mapping[str, Any], trust: TrustedIssuer, now: float, leeway: float
) -> None:
    expires, issued = number_claim(claims, "exp"), number_claim(claims, "iat")
    if now > expires + leeway:
        raise Unauthenticated("token expired (exp)", reason="expired")
    if issued > now + leeway:
        raise Unauthenticated("token issued in the future (iat)", reason="not_yet_valid")
    if "nbf" in claims and number_claim(claims, "nbf") > now + leeway:
        raise Unauthenticated("token not yet valid (nbf)", reason="not_yet_valid")
    if expires <= issued:
        raise Unauthenticated(
            "token expires before it was issued (exp <= iat)", reason="invalid_claims"
        )
    if trust.kind == "platform" and expires - issued > MAX_PLATFORM_LIFETIME:
        raise Unauthenticated("token lifetime (exp - iat) exceeds one day", reason="invalid_claims")


def _check_value(name: str, value: object, depth: int = 0) -> None:
    """Claims are strings of at most 256 characters, finite numbers, or small nests of those."""
    if depth > MAX_CLAIM_DEPTH:
        raise Unauthenticated(f"claim {name} is nested too deeply", reason="invalid_claims")
    if isinstance(value, str):
        if len(value) > MAX_CLAIM_CHARS:
            raise Unauthenticated(
                f"claim {name} is longer than {MAX_CLAIM_CHARS} characters", reason="invalid_claims"
            )
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        # Python's json accepts NaN and Infinity, which would poison every time comparison.
        if not math.isfinite(value) or abs(value) > 2**53:
            raise Unauthenticated(f"claim {name} is not a finite number", reason="invalid_claims")
    elif isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise Unauthenticated(f"claim {name} has too many items", reason="invalid_claims")
        for item in value:
            _check_value(name, item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(f"{name}.{key}", item, depth + 1)


def text_claim(claims: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise Unauthenticated(f"claim {name} must be a non-empty string", reason="invalid_claims")
    return value


def name_claim(claims: Mapping[str, Any], name: str) -> str:
    """A claim that policies write into ARNs and resource paths (identity/names.py)."""
    value = text_claim(claims, name)
    problem = name_problem(value)
    if problem:
        raise Unauthenticated(f"claim {name} {problem}", reason="invalid_claims")
    return value


def number_claim(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"claim {name} must be a number", reason="invalid_claims")
    return float(value)
