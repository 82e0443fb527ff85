"""One rule for what a secret looks like, applied the same way by the logs and the audit log."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaproxy.audit.record import AuditEvent
from metaproxy.logs import ContextFilter, JsonFormatter, TextFormatter
from metaproxy.redact import REDACTED, redact, redact_patterns

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0YXNrIn0.c2lnbmF0dXJl"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjE" + "A" * 300
PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----"
# The shapes the logs' own pattern used to miss: short JWT parts, a base64url run of 100-119.
SHORT_JWT = "eyJ.a.b"
BASE64URL_RUN = "A-" * 55


@pytest.mark.parametrize("secret", [JWT, SESSION_TOKEN, PRIVATE_KEY, SHORT_JWT, BASE64URL_RUN])
def test_logs_and_audit_records_redact_the_same_shapes(secret: str) -> None:
    """A JWT, session token, private key or long blob is redacted in a JSON log line, a text
    log line and an audit record alike."""
    text = f"upstream said {secret} was bad"
    record = logging.LogRecord("metaproxy.broker", logging.WARNING, __file__, 1, text, (), None)
    ContextFilter().filter(record)
    written = [
        json.loads(JsonFormatter().format(record))["message"],
        TextFormatter().format(record),
        str(AuditEvent(event="failed", request_id="r1", reason=text).record()["reason"]),
    ]
    for line in written:
        assert secret not in line
        assert REDACTED in line


def test_role_paths_may_form_long_runs_where_blobs_are_allowed() -> None:
    """`blobs=False` (IAM role ARNs) keeps a long path run but still redacts a JWT."""
    path = "arn:aws:iam::1:role/" + "team-a/" * 20 + "app"
    assert redact(path, blobs=False) == path
    assert redact(f"{path} {JWT}", blobs=False) == f"{path} {REDACTED}"


_fragments = st.sampled_from(
    ["eyJ", "eyJhbGciOiJFZERTQSJ9", ".", "-----BEGIN ", "PRIVATE KEY-----", "A" * 60, "x", " "]
)


@given(st.lists(st.one_of(_fragments, st.text(max_size=30)), max_size=12).map("".join))
def test_redact_skips_the_patterns_only_when_none_could_match(value: str) -> None:
    """The fast path (short, no JWT or PEM start) gives what the full patterns give."""
    assert redact(value) == redact_patterns(value)
    assert redact(value, blobs=False) == redact_patterns(value, blobs=False)
