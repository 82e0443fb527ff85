"""`metaproxy demo --once`: the whole flow as real processes, described by its state file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.support import REPO, clean_aws_env, run_command


async def test_demo_once_runs_everything_and_writes_the_state_file(tmp_path: Path) -> None:
    """Broker, sidecars and STS run as processes; boto3 sees each tenant's role; state is exact."""
    state_file = tmp_path / "state.json"
    rc, out, err = await run_command(
        sys.executable,
        "-m",
        "metaproxy",
        "demo",
        "--once",
        "--policies-dir",
        str(REPO / "policies"),
        "--state-dir",
        str(tmp_path / "demo"),
        "--state-file",
        str(state_file),
        env=clean_aws_env(),
        timeout=120,
    )
    assert rc == 0, err
    assert "assumed-role/acme-app/acme.demo-acme-1" in out
    assert "assumed-role/globex-app/globex.demo-globex-1" in out
    state = json.loads(state_file.read_text())
    assert set(state) == {"sts_endpoint", "broker", "sidecars", "audit_dir", "policies_dir"}
    assert set(state["broker"]) == {"url", "admin_url", "pid"}
    assert [s["tenant"] for s in state["sidecars"]] == ["acme", "globex"]
    for sidecar in state["sidecars"]:
        assert set(sidecar) == {
            "tenant",
            "task",
            "role_arn",
            "imds_url",
            "container_credentials_url",
            "authorization_token_file",
            "admin_url",
            "pid",
        }
        assert sidecar["role_arn"].endswith(f":role/{sidecar['tenant']}-app")
        assert sidecar["pid"] != os.getpid()
    assert list(Path(state["audit_dir"]).glob("segment-*.jsonl"))


async def test_demo_runs_again_in_the_same_state_dir_and_its_audit_log_verifies(
    tmp_path: Path,
) -> None:
    """A second run reuses the audit signing key, so the whole log still verifies."""
    state_dir = tmp_path / "demo"
    for _ in range(2):
        rc, _, err = await run_command(
            sys.executable, "-m", "metaproxy", "demo", "--once",
            "--policies-dir", str(REPO / "policies"), "--state-dir", str(state_dir),
            env=clean_aws_env(), timeout=120,
        )  # fmt: skip
        assert rc == 0, err
    public_key = state_dir / "keys" / "audit-keys" / "audit-signing.pub"
    rc, out, err = await run_command(
        sys.executable, "-m", "metaproxy", "audit", "verify", str(state_dir / "audit"),
        "--public-key", str(public_key), env=clean_aws_env(), timeout=60,
    )  # fmt: skip
    assert rc == 0, out + err
