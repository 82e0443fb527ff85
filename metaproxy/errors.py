"""One error tree. Each error carries its HTTP status, a stable code and a public message.

Clients only ever see `public_message` and a request id; the detail (which may name files,
upstream errors or internal state, never secrets) goes to the log and the audit record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from metaproxy.models import AssumeRoleSpec

# Why an identity token was refused, in words safe to show the task that sent it: each names a
# check the task can make itself on its own token, never a key, a file or a policy.
AuthReason = Literal[
    "missing",  # no bearer token
    "malformed",  # not a compact JWS we can read
    "expired",
    "not_yet_valid",  # iat or nbf in the future
    "bad_signature",  # no trusted key signed it (unknown kid, wrong key, tampered)
    "unknown_issuer",
    "wrong_audience",
    "invalid_claims",  # signed and in time, but a claim is missing or out of shape
]


class MetaproxyError(Exception):
    status = 500
    code = "InternalError"
    public_message = "internal error"
    retry_after: float | None = None
    # A category the client may see beside the public message (401s: an `AuthReason`).
    reason: str | None = None
    # Logged at DEBUG: one of many identical refusals already accounted for (broker/authn.py).
    quiet = False

    def __init__(self, detail: str = "", *, public_message: str | None = None) -> None:
        super().__init__(detail or self.public_message)
        self.detail = detail or self.public_message
        if public_message is not None:
            self.public_message = public_message


class BadRequest(MetaproxyError):
    status = 400
    code = "BadRequest"
    public_message = "bad request"


class Unauthenticated(MetaproxyError):
    status = 401
    code = "Unauthenticated"
    public_message = "identity token rejected"

    def __init__(
        self,
        detail: str = "",
        *,
        reason: AuthReason | None = None,
        public_message: str | None = None,
    ) -> None:
        super().__init__(detail, public_message=public_message)
        self.reason = reason


class UnsupportedMediaType(MetaproxyError):
    status = 415
    code = "UnsupportedMediaType"
    public_message = "unsupported media type"


class Denied(MetaproxyError):
    status = 403
    code = "AccessDenied"
    public_message = "denied by policy"


class RevokedWhileFetching(Denied):
    """A revocation arrived while this request's credentials were being fetched (queued, waiting
    for the budget or another replica's call, at STS): what came back is never served or
    cached."""


class NotFound(MetaproxyError):
    status = 404
    code = "NotFound"
    public_message = "not found"


class TooManyRequests(MetaproxyError):
    status = 429
    code = "TooManyRequests"
    public_message = "rate limit exceeded"

    def __init__(self, detail: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unavailable(MetaproxyError):
    status = 503
    code = "ServiceUnavailable"
    public_message = "service unavailable, retry later"

    def __init__(
        self, detail: str = "", *, retry_after: float = 1.0, public_message: str | None = None
    ) -> None:
        super().__init__(detail, public_message=public_message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    code = "Overloaded"
    public_message = "broker overloaded, retry later"


class StsUnavailable(Unavailable):
    code = "StsUnavailable"
    public_message = "credential service temporarily unavailable"


class RevocationsStale(Unavailable):
    """The replica cannot tell whether the task is revoked (the fleet store is unreachable)."""

    code = "RevocationsStale"
    public_message = "broker cannot confirm revocations right now, retry later"


class AuditUnavailable(Unavailable):
    code = "AuditUnavailable"
    public_message = "audit log unavailable; refusing to issue credentials"


class UpstreamError(MetaproxyError):
    """STS refused in a way retrying will not fix (e.g. the role does not trust the broker)."""

    status = 502
    code = "UpstreamError"
    public_message = "credential service refused the request"


class PackedPolicyTooLarge(UpstreamError):
    """STS refused the session policy and tags together as too large: the tenant's policy has
    to change, so the caller is told which role and which tags, and retrying will not help."""

    status = 403
    code = "PackedPolicyTooLarge"
    public_message = "session policy and tags too large for STS"

    @classmethod
    def for_spec(cls, spec: AssumeRoleSpec, detail: str) -> PackedPolicyTooLarge:
        keys = ", ".join(key for key, _ in spec.tags) or "none"
        policy = (
            f"a {len(spec.session_policy)}-character session policy"
            if spec.session_policy
            else "no session policy"
        )
        message = (
            f"role {spec.role_arn.rsplit('/', 1)[-1]}: the session tags ({keys}) and "
            f"{policy} exceed what STS accepts (PackedPolicyTooLarge); "
            "the tenant's policy must send fewer or shorter tags"
        )
        return cls(detail, public_message=message)


class ConfigError(MetaproxyError):
    """Bad configuration or policy: refused at start-up or on reload, never at request time."""

    status = 500
    code = "ConfigError"
    public_message = "configuration error"


class StartError(MetaproxyError):
    """A command cannot start or go on: a port already in use, a file missing or unreadable.
    The CLI prints the detail as one line and exits 1 (ConfigError, a usage mistake, exits 2)."""

    code = "StartError"
    public_message = "cannot start"
