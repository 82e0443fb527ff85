"""Audit records: one per broker decision, with who, what, why and where, and never a secret.

An `AuditEvent` has only named, non-secret fields (there is none for a secret key, session
token or identity token), is checked when it is built, and still redacts anything that *looks*
like a credential when it becomes a record, because a `reason` built from an upstream error
message could quote one. The record is the event's non-empty fields, in field order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final, Literal, get_args, get_type_hints

from metaproxy.redact import redact

EventName = Literal[
    "issued",
    "refreshed",
    "denied",
    "throttled",
    "failed",
    "revoked",
    "lifted",  # a revocation taken back through the control API
    "restored",  # a revocation the store had lost, kept in force and written back
    "listed",  # the revocations read through the control API
]
EVENTS: Final[tuple[EventName, ...]] = get_args(EventName)

MAX_FIELD_CHARS: Final = 2048
# IAM role paths may legitimately form long slash-separated runs.
_BLOBS_ALLOWED: Final = frozenset({"role_arn", "via_role_arn"})


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """One audited event. `via_role_arn` and `via_access_key_id` name a chain's first hop (the
    session that assumed `role_arn`); `packed_policy_size` is STS's percentage for the grant's
    policy and tags; `count` is how many answered requests one summary record stands for."""

    event: EventName
    request_id: str
    task: str = ""
    tenant: str = ""
    team: str = ""
    subject: str = ""
    issuer: str = ""
    token_id: str = ""
    role_arn: str = ""
    via_role_arn: str = ""
    via_access_key_id: str = ""
    session_name: str = ""
    source_identity: str = ""
    access_key_id: str = ""
    expiration: str = ""
    policy_digest: str = ""
    rule: str = ""
    reason: str = ""
    peer: str = ""
    operator: str = ""  # whose control token a control request carried
    instance: str = ""
    status: int = 0
    packed_policy_size: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        """Raises ValueError on an unknown event or a field of the wrong kind: callers outside
        the type checker (tools, tests, a future caller with a loose dict) get no bad record."""
        if self.event not in EVENTS:
            raise ValueError(
                f"unknown audit event {self.event!r}; expected one of {', '.join(EVENTS)}"
            )
        if not self.request_id:
            raise ValueError("audit record needs a request_id")
        status = self.status
        if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 999:
            raise ValueError(f"audit status must be an HTTP status code or 0, got {status!r}")
        _check_count("packed_policy_size", self.packed_policy_size)
        _check_count("count", self.count)
        for field in _TEXT_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, str):
                raise ValueError(
                    f"audit field {field} must be a string, got {type(value).__name__}"
                )

    def record(self) -> dict[str, object]:
        """The record for `AuditLog.append`: empty fields left out (smaller lines, and absent
        reads as ""), text redacted and capped."""
        record: dict[str, object] = {"event": self.event}
        for field in _TEXT_FIELDS:
            value: str = getattr(self, field)
            if value:
                record[field] = _capped(redact(value, blobs=field not in _BLOBS_ALLOWED))
        if self.status:
            record["status"] = self.status
        if self.packed_policy_size is not None:
            record["packed_policy_size"] = self.packed_policy_size
        if self.count is not None:
            record["count"] = self.count
        return record


_HINTS: Final = get_type_hints(AuditEvent)
_TEXT_FIELDS: Final = tuple(f.name for f in fields(AuditEvent) if _HINTS[f.name] is str)


def _check_count(name: str, number: int | None) -> None:
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        raise ValueError(f"audit {name} must be an integer, got {number!r}")


def _capped(value: str) -> str:
    if len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + "...[truncated]"
    return value


def make_record(event: str, **fields: Any) -> dict[str, object]:
    """`AuditEvent(event=event, **fields).record()`, for tools and tests that build records
    from loose values; raises ValueError on a bad event or field."""
    return AuditEvent(event=event, **fields).record()  # type: ignore[arg-type]  # checked
