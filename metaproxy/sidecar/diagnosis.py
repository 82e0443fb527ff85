"""Why the sidecar is not ready, in one line an operator can act on (`/readyz`, the log).

A sidecar that could not get credentials once said nothing at all (a missing CA file) or only
"identity token rejected" (when the audit log knew the token had expired). Each failure now has
its own line: which file, which TLS check, which broker answer. Nothing in it is secret: file
paths, the broker's public code, message and 401 category, and the token's expiry time.
"""

from __future__ import annotations

from metaproxy.clock import iso_z
from metaproxy.sidecar.broker_client import BrokerError

WAITING = "waiting for the first answer from the broker"


def describe(error: BrokerError, broker: str) -> str:  # noqa: PLR0911 - one line per cause
    """The one line for a failed fetch; `broker` names where it was sent (URL or socket)."""
    code = error.code
    if code in ("IdentityTokenUnreadable", "IdentityTokenEmpty"):
        return f"identity token file unusable: {error.message}"
    if code == "AttestationUnavailable":
        return f"AWS attestation unusable: {error.message}"
    if code in ("CaUnreadable", "CaInvalid"):
        return f"broker CA bundle unusable: {error.message}"
    if code == "TlsVerificationFailed":
        return f"TLS verification of the broker at {broker} failed: {error.message}"
    if code == "TlsFailed":
        return f"TLS with the broker at {broker} failed: {error.message}"
    if code == "BrokerUnreachable":
        return f"broker unreachable at {broker}: {error.message}"
    if code == "BadBrokerReply":
        return f"broker at {broker} sent an answer the sidecar cannot use: {error.message}"
    if error.status == 401:
        if error.reason == "expired" and error.identity_expiry is not None:
            return f"identity token expired at {iso_z(error.identity_expiry)} (broker answered 401)"
        reason = error.reason or "no reason given"
        return f"broker refused the identity token: {reason} (401 {code})"
    if error.status == 403:
        return f"broker denied this task: {code} ({error.message or 'no message'})"
    retry = f", retry after {error.retry_after:g}s" if error.retry_after else ""
    return f"broker answered {error.status} {code}: {error.message or 'no message'}{retry}"
