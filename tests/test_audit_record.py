"""Audit records: only the documented events, typed fields, and no secret in any value."""

from __future__ import annotations

import json

import pytest

from metaproxy.audit.record import EVENTS, make_record


def test_make_record_rejects_unknown_event() -> None:
    """Only the documented events can be recorded."""
    assert EVENTS == (
        "issued",
        "refreshed",
        "denied",
        "throttled",
        "failed",
        "revoked",
        "lifted",
        "restored",
        "listed",
    )
    with pytest.raises(ValueError, match="unknown audit event"):
        make_record("granted", request_id="r1")


def test_make_record_redacts_credential_shaped_values() -> None:
    """A JWT, a long opaque token or a private key never reaches a record, wherever it hides."""
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0YXNrIn0.c2lnbmF0dXJl"
    session_token = "IQoJb3JpZ2luX2VjE" + "A" * 300
    record = make_record(
        "failed",
        request_id="r1",
        reason=f"sts said token {jwt} and {session_token} were bad",
        subject=jwt,
        status=502,
    )
    text = json.dumps(record)
    assert jwt not in text
    assert "IQoJb3JpZ2luX2VjE" not in text
    assert record["subject"] == "[redacted]"
    assert record["status"] == 502
    assert record["event"] == "failed"


def test_make_record_validates_field_types() -> None:
    """Non-string fields and impossible statuses are refused, not stored."""
    with pytest.raises(ValueError, match="status"):
        make_record("denied", request_id="r1", status=10_000)
    with pytest.raises(ValueError, match="request_id"):
        make_record("denied", request_id="")
