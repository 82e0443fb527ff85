"""Runs last (by name): no secret issued during the run is in any log or audit file it wrote.

conftest records every identity token `issue()` made and every secret access key and session
token the brokers cached; this scans for those exact values in the session log (all log
records of this process, unscrubbed), the audit segments and checkpoints, and every other
log file the run wrote (child processes' output).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SECRETS_FILE = "issued-secrets.json"  # written from the same set; holds the secrets by design


def is_log_or_audit_file(path: Path) -> bool:
    name = path.name
    return (
        name.endswith((".log", ".jsonl"))
        or (name.startswith("checkpoint-") and name.endswith(".json"))
        or name == "latest-checkpoint.json"
    )


def test_no_issued_secret_in_any_log_or_audit_file(
    tmp_path_factory: pytest.TempPathFactory, session_log: Path, issued_secrets: set[str]
) -> None:
    """Exact secret keys, session tokens and identity tokens never reach a log or audit file."""
    base = tmp_path_factory.getbasetemp()
    assert session_log.exists()
    secrets = sorted(s for s in issued_secrets if len(s) >= 16)
    (base / SECRETS_FILE).write_text(json.dumps(secrets))
    # Make sure this test is not vacuous: tokens and STS secrets were recorded, files found.
    assert any(s.startswith("eyJ") for s in secrets), "no identity token was recorded"
    assert any(not s.startswith("eyJ") for s in secrets), "no STS secret was recorded"

    scanned = [p for p in base.rglob("*") if p.is_file() and is_log_or_audit_file(p)]
    assert session_log in scanned
    assert any(p.name.startswith("segment-") for p in scanned), "no audit segment found"

    leaks: list[str] = []
    for path in scanned:
        data = path.read_bytes()
        for secret in secrets:
            if secret.encode() in data:
                kind = "identity token" if secret.startswith("eyJ") else "STS secret"
                leaks.append(f"{path.relative_to(base)}: an issued {kind}")
    assert not leaks, "\n".join(leaks)
