"""`metaproxy demo --once`: the whole flow as real processes, described by its state file."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

from tests.conftest import require_redis_server
from tests.support import REPO, clean_aws_env, run_command

STATE_KEYS = {
    "sts_endpoint",
    "ca_file",
    "control_token_file",
    "store",
    "broker",
    "brokers",
    "sidecars",
    "audit_dir",
    "policies_dir",
}
BROKER_KEYS = {"url", "admin_url", "control_url", "instance", "pid"}


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
    assert set(state) == STATE_KEYS
    assert set(state["broker"]) == BROKER_KEYS
    assert state["broker"]["instance"] == "demo-broker"
    assert state["brokers"] == [state["broker"]]
    assert state["store"] == {"url": "memory", "pid": None}
    assert Path(state["ca_file"]).is_file()
    assert Path(state["control_token_file"]).stat().st_mode & 0o777 == 0o600
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


async def test_demo_with_two_replicas_shares_a_redis_store_and_spreads_the_sidecars(
    tmp_path: Path,
) -> None:
    """--replicas 2: a local Redis, two brokers on it, one sidecar each, every boto3 call works."""
    require_redis_server()
    state_file = tmp_path / "state.json"
    rc, out, err = await run_command(
        sys.executable, "-m", "metaproxy", "demo", "--once", "--replicas", "2",
        "--policies-dir", str(REPO / "policies"), "--state-dir", str(tmp_path / "demo"),
        "--state-file", str(state_file), env=clean_aws_env(), timeout=120,
    )  # fmt: skip
    assert rc == 0, err
    assert "assumed-role/acme-app/acme.demo-acme-1 (broker demo-broker-1)" in out
    assert "assumed-role/globex-app/globex.demo-globex-1 (broker demo-broker-2)" in out
    state = json.loads(state_file.read_text())
    assert set(state) == STATE_KEYS
    assert state["store"]["url"].startswith("redis://127.0.0.1:")
    assert isinstance(state["store"]["pid"], int)
    assert [b["instance"] for b in state["brokers"]] == ["demo-broker-1", "demo-broker-2"]
    assert all(set(b) == BROKER_KEYS for b in state["brokers"])
    assert state["broker"] == state["brokers"][0]
    assert len({b["pid"] for b in state["brokers"]}) == 2
    assert [s["tenant"] for s in state["sidecars"]] == ["acme", "globex"]
    for sidecar in state["sidecars"]:
        assert sidecar["role_arn"].endswith(f":role/{sidecar['tenant']}-app")
    keys = Path(state["control_token_file"]).parent
    store_key = base64.b64decode((keys / "store.key").read_text().strip(), validate=True)
    assert len(store_key) == 32
    assert (keys / "store.key").stat().st_mode & 0o777 == 0o600
    assert all(b["control_url"].startswith("https://127.0.0.1:") for b in state["brokers"])
    for instance in ("demo-broker-1", "demo-broker-2"):
        assert list((Path(state["audit_dir"]) / instance).glob("segment-*.jsonl"))
    aof = b"".join(p.read_bytes() for p in (tmp_path / "demo" / "redis").rglob("*.aof"))
    assert b"metaproxy" in aof, "the brokers wrote nothing to the shared store"
    rc, out, err = await run_command(
        sys.executable, "-m", "metaproxy", "audit", "verify", "--fleet", state["audit_dir"],
        "--public-key", str(keys / "audit-keys" / "audit-signing.pub"),
        env=clean_aws_env(), timeout=60,
    )  # fmt: skip
    assert rc == 0, out + err
    assert "2 replicas" in out
