"""SPIFFE JWT-SVIDs: a workload's SPIFFE ID, read as the app and task it names.

A JWT-SVID's `sub` is a SPIFFE ID, `spiffe://TRUST_DOMAIN/PATH`. The trust domain selects the
keys (the trust domain's bundle: SPIRE's bundle endpoint is a JWKS URL, `remote_keys.py`) and,
in tenant policies, the tenant (`kind = "spiffe"`, `trust_domain = …`). The path names the app
and the task through the broker's `--spiffe-paths` templates, tried in order: literal segments,
`{app}`, `{task}` and `{*}` (any one segment), e.g. `/app/{app}/task/{task}` or
`/ns/{*}/sa/{app}` (SPIRE's Kubernetes form; without `{task}` the task is the app).

Templates come from configuration and are matched segment by segment: nothing of the token is
ever compiled into a pattern, and every captured segment must be a valid name
(`identity/names.py`) before it can reach an ARN, a session name or an S3 prefix. The ID itself
is parsed as the SPIFFE standard says: lower-case trust domain, path segments of
`A-Z a-z 0-9 . - _`, no empty, `.` or `..` segment, no query, fragment, port or user.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.claims import number_claim, text_claim
from metaproxy.identity.names import name_problem
from metaproxy.models import Identity

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
DEFAULT_PATHS = ("/app/{app}/task/{task}", "/ns/{*}/sa/{app}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}", re.ASCII)
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)
_PLACEHOLDERS = ("{app}", "{task}", "{*}")


def trust_domain_problem(domain: str) -> str | None:
    if not _TRUST_DOMAIN.fullmatch(domain):
        return "must be a SPIFFE trust domain (lower-case a-z 0-9 . - _)"
    return None


def split_id(spiffe_id: str) -> tuple[str, tuple[str, ...]]:
    """(trust domain, path segments) of a SPIFFE ID, or Unauthenticated naming what is wrong."""
    if len(spiffe_id.encode()) > MAX_ID_BYTES or not spiffe_id.startswith(SCHEME):
        raise Unauthenticated("claim sub is not a SPIFFE ID", reason="invalid_claims")
    domain, _, path = spiffe_id[len(SCHEME) :].partition("/")
    if trust_domain_problem(domain):
        raise Unauthenticated("claim sub has no valid trust domain", reason="invalid_claims")
    segments = tuple(path.split("/")) if path else ()
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise Unauthenticated("claim sub has an invalid SPIFFE path", reason="invalid_claims")
    if not segments:
        raise Unauthenticated(
            "claim sub names a trust domain, not a workload", reason="invalid_claims"
        )
    return domain, segments


def trust_domain_of(claims: Mapping[str, Any]) -> str | None:
    """The trust domain a token's `sub` names, if it is a SPIFFE ID (for picking its keys)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith(SCHEME):
        return None
    domain = sub[len(SCHEME) :].partition("/")[0]
    return None if trust_domain_problem(domain) else domain


@dataclass(frozen=True, slots=True)
class PathRule:
    """One `--spiffe-paths` template, split into its segments."""

    template: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, template: str) -> PathRule:
        where = f"--spiffe-paths: {template!r}"
        if not template.startswith("/") or template.endswith("/"):
            raise ConfigError(f"{where} must start with / and not end with one")
        segments = tuple(template[1:].split("/"))
        for segment in segments:
            if segment not in _PLACEHOLDERS and not _SEGMENT.fullmatch(segment):
                raise ConfigError(
                    f"{where}: {segment!r} is neither a name nor {{app}} {{task}} {{*}}"
                )
        if segments.count("{app}") != 1 or segments.count("{task}") > 1:
            raise ConfigError(f"{where} must hold {{app}} once and {{task}} at most once")
        return cls(template, segments)

    def match(self, path: Sequence[str]) -> tuple[str, str] | None:
        """(app, task) if `path` fits the template segment for segment, else None."""
        if len(path) != len(self.segments):
            return None
        found: dict[str, str] = {}
        for want, got in zip(self.segments, path, strict=True):
            if want in ("{app}", "{task}"):
                found[want] = got
            elif want not in ("{*}", got):
                return None
        app = found["{app}"]
        return app, found.get("{task}", app)


def parse_rules(templates: Sequence[str]) -> tuple[PathRule, ...]:
    return tuple(PathRule.parse(t) for t in templates)


def spiffe_identity(claims: Mapping[str, Any], rules: Sequence[PathRule]) -> Identity:
    """The workload a verified JWT-SVID names, its app and task read by the first rule that
    fits its path; Unauthenticated if none does or a captured name is not a valid name."""
    subject = text_claim(claims, "sub")
    domain, path = split_id(subject)
    for rule in rules:
        named = rule.match(path)
        if named is None:
            continue
        for what, value in zip(("app", "task"), named, strict=True):
            if problem := name_problem(value):
                raise Unauthenticated(f"SPIFFE ID {what} {problem}", reason="invalid_claims")
        app, task = named
        return Identity(
            kind="spiffe",
            issuer=SCHEME + domain,
            subject=subject,
            task=task,
            app=app,
            token_id=text_claim(claims, "jti", required=False),
            expires_at=number_claim(claims, "exp"),
        )
    raise Unauthenticated("SPIFFE ID path matches no --spiffe-paths rule", reason="invalid_claims")
