"""What the sidecar can tell of its own identity token without verifying it (the broker
verifies): when it expires and which task it names, for /readyz, /metrics and the log.

A sidecar whose token was never rotated used to stay ready on cached credentials, log one
warning, and no longer see a revocation. Now an expired token is a state: /readyz answers 503
with the expiry time, the metric `metaproxy_sidecar_identity_remaining_seconds{task}` goes
negative, and the keeper stops serving once the broker has refused the token for longer than
`--revocation-max-staleness`. A token with under `EXPIRY_WARNING` seconds left is reported in
/readyz's body while it stays ready.

Read from the token file at every broker call (at least every `--revocation-check-seconds`),
so a token rotated, or not, shows within one refresh period. The task label comes from the
token's claims, unverified, kept to STS session-name characters so it cannot break a label.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from metaproxy.clock import iso_z

EXPIRY_WARNING = 300.0  # seconds: a token this close to expiry, not yet rotated, is reported
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+=,.@-]{0,127}", re.ASCII)


@dataclass(frozen=True, slots=True)
class TokenFacts:
    expires_at: datetime | None  # None: the token carries no readable `exp`
    task: str  # label-safe; "unknown" when no claim names one

    def left(self, now: datetime) -> float | None:
        """Seconds until the token expires (negative past it), or None if unknown."""
        return None if self.expires_at is None else (self.expires_at - now).total_seconds()

    def expired_line(self, now: datetime) -> str:
        """ "identity token expired at …" once it has, else ""."""
        left = self.left(now)
        if left is None or left > 0 or self.expires_at is None:
            return ""
        return f"identity token expired at {iso_z(self.expires_at)} and was not rotated"

    def expiring_line(self, now: datetime) -> str:
        """ "identity token expires at …" while under `EXPIRY_WARNING` seconds are left."""
        left = self.left(now)
        if left is None or not 0 < left < EXPIRY_WARNING or self.expires_at is None:
            return ""
        return f"identity token expires at {iso_z(self.expires_at)} (in {left:.0f}s), not rotated"


def token_facts(token: str) -> TokenFacts:
    claims = _claims(token)
    expires_at = None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        try:
            expires_at = datetime.fromtimestamp(exp, UTC)
        except (OverflowError, OSError, ValueError):
            expires_at = None
    return TokenFacts(expires_at, _task(claims))


def _claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _task(claims: dict[str, Any]) -> str:
    """The platform token's `task`, else the Kubernetes pod's name, else its service account."""
    k8s = _table(claims, "kubernetes.io")
    pod, account = _table(k8s, "pod"), _table(k8s, "serviceaccount")
    for candidate in (claims.get("task"), pod.get("name"), account.get("name")):
        if isinstance(candidate, str) and _LABEL.fullmatch(candidate):
            return candidate
    return "unknown"


def _table(claims: dict[str, Any], name: str) -> dict[str, Any]:
    value = claims.get(name)
    return value if isinstance(value, dict) else {}
