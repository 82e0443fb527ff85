"""Minting platform identity tokens: what the platform hands each task to prove who it is."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt

from metaproxy.errors import BadRequest
from metaproxy.identity.keys import load_private_key
from metaproxy.identity.names import MAX_TTL_SECONDS, MIN_TTL_SECONDS, name_problem

MAX_CLAIM_CHARS = 256


def check_claim_text(name: str, value: object, *, required: bool = True) -> str:
    """A claim string: printable, at most 256 characters, non-empty when required."""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if required and not value:
        raise BadRequest(f"{name} must not be empty")
    if len(value) > MAX_CLAIM_CHARS:
        raise BadRequest(f"{name} must be at most {MAX_CLAIM_CHARS} characters")
    if not value.isprintable():
        raise BadRequest(f"{name} must be printable text")
    return value


def issue_token(
    key_path: Path,
    *,
    issuer: str,
    audience: str,
    task: str,
    tenant: str,
    app: str = "",
    ttl: int = 3600,
    now: float | None = None,
) -> str:
    """A JWT for one task of one tenant, signed with the key at `key_path` (EdDSA or ES256)."""
    check_claim_text("issuer", issuer)
    check_claim_text("audience", audience)
    check_claim_text("task", task)
    check_claim_text("tenant", tenant)
    check_claim_text("app", app, required=False)
    # Policies write these into ARNs and S3 prefixes; the broker refuses anything else too.
    for name, value in (("task", task), ("tenant", tenant), ("app", app)):
        problem = name_problem(value) if value or name != "app" else None
        if problem:
            raise BadRequest(f"{name} {problem}")
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise BadRequest("ttl must be an integer number of seconds")
    if not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
        raise BadRequest(f"ttl must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS} seconds")
    key, kid, alg = load_private_key(key_path)
    issued_at = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": f"task:{tenant}/{task}",
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
        "jti": secrets.token_urlsafe(16),
        "task": task,
        "tenant": tenant,
        "app": app,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
