"""`metaproxy identity …` on the command line: files written, tokens issued, exit codes."""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metaproxy.config import TrustedIssuer
from metaproxy.identity import cli
from metaproxy.identity.document import sign_document
from metaproxy.identity.verify import IdentityVerifier


def run(*argv: str) -> int:
    """Parse with only this subsystem registered, so other modules' state cannot interfere."""
    parser = argparse.ArgumentParser(prog="metaproxy")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_keygen_then_issue_to_file(tmp_path: Path) -> None:
    """keygen writes key and JWKS; issue --out writes a 0600 token file with no newline."""
    assert (
        run("identity", "keygen", "--out", str(tmp_path), "--name", "plat", "--alg", "ES256") == 0
    )
    key, jwks = tmp_path / "plat.key", tmp_path / "plat.jwks.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert json.loads(jwks.read_text())["keys"][0]["alg"] == "ES256"

    token_file = tmp_path / "run" / "identity.jwt"
    status = run(
        "identity", "issue", "--key", str(key), "--task", "t-9", "--tenant", "acme",
        "--app", "web", "--ttl", "600", "--out", str(token_file),
    )  # fmt: skip
    assert status == 0
    token = token_file.read_bytes()
    assert not token.endswith(b"\n")
    assert token.count(b".") == 2
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [p.name for p in token_file.parent.iterdir()] == ["identity.jwt"]

    verifier = IdentityVerifier([TrustedIssuer("metaproxy-platform", "metaproxy-broker", jwks)])
    identity = verifier.verify(token.decode())
    assert (identity.task, identity.tenant, identity.app) == ("t-9", "acme", "web")


def test_issue_prints_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --out the token goes to stdout, honouring --issuer and --audience."""
    run("identity", "keygen", "--out", str(tmp_path))
    capsys.readouterr()
    status = run(
        "identity", "issue", "--key", str(tmp_path / "identity.key"), "--task", "t-1",
        "--tenant", "acme", "--issuer", "https://iss.example", "--audience", "other",
    )  # fmt: skip
    assert status == 0
    token = capsys.readouterr().out.strip()
    trust = TrustedIssuer("https://iss.example", "other", tmp_path / "identity.jwks.json")
    assert IdentityVerifier([trust]).verify(token).subject == "task:acme/t-1"


def test_issue_refuses_invalid_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ttl outside 60..86400 exits 2 with the reason and writes nothing."""
    run("identity", "keygen", "--out", str(tmp_path))
    out = tmp_path / "token"
    status = run(
        "identity", "issue", "--key", str(tmp_path / "identity.key"), "--task", "t",
        "--tenant", "acme", "--ttl", "5", "--out", str(out),
    )  # fmt: skip
    assert status == 2
    assert "ttl" in capsys.readouterr().err
    assert not out.exists()


def test_verify_document_exit_codes(tmp_path: Path) -> None:
    """verify-document exits 0 for a valid signature and 1 after a one-byte change."""
    key = tmp_path / "identity.key"
    run("identity", "keygen", "--out", str(tmp_path))
    text, signature = sign_document(
        key,
        {
            "accountId": "123456789012", "architecture": "arm64",
            "availabilityZone": "eu-west-1b", "imageId": "ami-1", "instanceId": "i-1",
            "instanceType": "t4g.small", "pendingTime": datetime(2024, 1, 1, tzinfo=UTC),
            "privateIp": "10.1.2.3", "region": "eu-west-1", "version": "2017-09-30",
            "taskId": "t-1", "tenant": "acme",
        },
    )  # fmt: skip
    document, signature_file = tmp_path / "document", tmp_path / "signature"
    document.write_text(text)
    signature_file.write_text(signature + "\n")
    argv = ["identity", "verify-document", "--key-file", str(tmp_path / "identity.jwks.json")]
    argv += ["--document", str(document), "--signature", str(signature_file)]
    assert run(*argv) == 0
    document.write_text(text.replace("t-1", "t-2"))
    assert run(*argv) == 1


def test_real_entry_point_issues_token(tmp_path: Path) -> None:
    """`python -m metaproxy identity …` works as a real process."""
    base = [sys.executable, "-m", "metaproxy", "identity"]
    subprocess.run([*base, "keygen", "--out", str(tmp_path)], check=True, capture_output=True)
    result = subprocess.run(
        [*base, "issue", "--key", str(tmp_path / "identity.key"), "--task", "t", "--tenant", "a"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert result.stdout.count(".") == 2
    missing = subprocess.run(
        [*base, "issue", "--key", str(tmp_path / "nope.key"), "--task", "t", "--tenant", "a"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 1  # a run-time failure, not a usage mistake
    assert (
        missing.stderr
        == f"metaproxy identity issue: --key: {tmp_path / 'nope.key'}: No such file or directory\n"
    )
