"""Audit records: one per broker decision, with who, what, why and where, and never a secret.

`make_record` takes only named, non-secret fields (there is no parameter for a secret key,
session token or identity token), and still redacts anything that *looks* like a credential
(by the logs' rule too, `redact.py`), because a `reason` built from an upstream error message
could quote one.
"""

from __future__ import annotations

from typing import Final

from metaproxy.redact import redact

EVENTS: Final = (
    "issued",
    "refreshed",
    "denied",
    "throttled",
    "failed",
    "revoked",
    "lifted",  # a revocation taken back through the control API
    "restored",  # a revocation the store had lost, kept in force and written back
    "listed",  # the revocations read through the control API
)

MAX_FIELD_CHARS: Final = 2048


def scrub(value: str, *, blobs: bool = True) -> str:
    """Redact anything credential-shaped in `value` and cap its length."""
    value = redact(value, blobs=blobs)
    if len(value) > MAX_FIELD_CHARS:
        value = value[:MAX_FIELD_CHARS] + "...[truncated]"
    return value


def make_record(
    event: str,
    *,
    request_id: str,
    task: str = "",
    tenant: str = "",
    team: str = "",
    subject: str = "",
    issuer: str = "",
    token_id: str = "",
    role_arn: str = "",
    via_role_arn: str = "",
    via_access_key_id: str = "",
    session_name: str = "",
    source_identity: str = "",
    access_key_id: str = "",
    expiration: str = "",
    policy_digest: str = "",
    rule: str = "",
    reason: str = "",
    peer: str = "",
    instance: str = "",
    status: int = 0,
    packed_policy_size: int | None = None,
) -> dict[str, object]:
    """Build a validated record for `AuditLog.append`; raises ValueError on a bad event/field.

    `via_role_arn` and `via_access_key_id` name a chain's first hop (the session that assumed
    `role_arn`); `packed_policy_size` is STS's percentage for the grant's policy and tags."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; expected one of {', '.join(EVENTS)}")
    if not request_id:
        raise ValueError("audit record needs a request_id")
    if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 999:
        raise ValueError(f"audit status must be an HTTP status code or 0, got {status!r}")
    text_fields = {
        "request_id": request_id,
        "task": task,
        "tenant": tenant,
        "team": team,
        "subject": subject,
        "issuer": issuer,
        "token_id": token_id,
        "role_arn": role_arn,
        "via_role_arn": via_role_arn,
        "via_access_key_id": via_access_key_id,
        "session_name": session_name,
        "source_identity": source_identity,
        "access_key_id": access_key_id,
        "expiration": expiration,
        "policy_digest": policy_digest,
        "rule": rule,
        "reason": reason,
        "peer": peer,
        "instance": instance,
    }
    record: dict[str, object] = {"event": event}
    for name, value in text_fields.items():
        if not isinstance(value, str):
            raise ValueError(f"audit field {name} must be a string, got {type(value).__name__}")
        # IAM role paths may legitimately form long slash-separated runs.
        if value:  # empty fields are left out: smaller lines, and absent reads as ""
            record[name] = scrub(value, blobs=name not in ("role_arn", "via_role_arn"))
    if status:
        record["status"] = status
    if packed_policy_size is not None:
        if isinstance(packed_policy_size, bool) or not isinstance(packed_policy_size, int):
            raise ValueError(
                f"audit packed_policy_size must be an integer, got {packed_policy_size!r}"
            )
        record["packed_policy_size"] = packed_policy_size
    return record
