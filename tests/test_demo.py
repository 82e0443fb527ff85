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
