"""`metaproxy demo --once`: the whole flow as real processes, described by its state file."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_demo_once_runs_everything_writes_the_state_file_and_runs_again(
    tmp_path: Path,
) -> None:
    """Broker, sidecars and STS run as processes; boto3 sees each tenant's role; state is exact.
    A second run in the same state dir reuses the audit signing key, so the whole log verifies.
    (One test: each run of the demo is three seconds of CPU.)"""
    state_file = tmp_path / "state.json"
    state_dir = tmp_path / "demo"
    rc, out, err = await run_command(
        sys.executable, "-m", "metaproxy", "demo", "--once",
        "--policies-dir", str(REPO / "policies"), "--state-dir", str(state_dir),
        "--state-file", str(state_file), env=clean_aws_env(), timeout=120,
    )  # fmt: skip
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


@pytest.mark.slow  # started first: see tests/conftest.py
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
    assert state["store"]["url"].startswith("redis://:***@127.0.0.1:")
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
    password_file = keys / "store.password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_bytes()
    assert len(password) >= 32
    holding = [
        path.name
        for path in (tmp_path / "demo").rglob("*")
        if path.is_file() and password in path.read_bytes()
    ]
    assert sorted(holding) == ["redis.conf", "store.password"]  # both 0600; no log, no state
    assert password.decode() not in out + err
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


def _store_asks_for_its_password(printed: str, state_dir: Path, members: set[int]) -> None:
    """The demo's store refuses a client without the password, which nothing printed and no
    process's command line holds (the brokers have it in their environment)."""
    password = (state_dir / "keys" / "store.password").read_bytes()
    assert password.decode() not in printed
    found = re.search(r"store \(redis\) +redis://:\*\*\*@127\.0\.0\.1:(\d+)", printed)
    assert found is not None, printed
    with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=5) as store:
        store.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert store.recv(256).startswith(b"-NOAUTH")
    for pid in members:
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        assert password not in command_line, pid


def _group_members(pgid: int) -> set[int]:
    """Every live process whose process group is `pgid` (what a terminal's Ctrl-C reaches)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


def _wait_for_line(out_file: Path, text: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = out_file.read_text()
        if text in out:
            return out
        assert process.poll() is None, out
        time.sleep(0.2)
    raise AssertionError(f"demo never printed {text!r}:\n{out_file.read_text()}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.slow  # started first: see tests/conftest.py
def test_demo_ctrl_c_drains_every_child_in_order_and_closes_the_audit_log(
    tmp_path: Path, replicas: int
) -> None:
    """Ctrl-C (SIGINT to the terminal's whole process group) stops sidecars, brokers, store and
    STS in that order, each drained within the drain time; the newest audit segment is covered
    by a checkpoint; the printed export and `aws` lines work as pasted."""
    if replicas > 1:
        require_redis_server()
    drain = 3.0
    out_file = tmp_path / "demo.out"
    state_dir = tmp_path / "demo"
    with out_file.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "metaproxy", "demo", "--replicas", str(replicas),
                "--policies-dir", str(REPO / "policies"), "--state-dir", str(state_dir),
                "--drain-seconds", str(drain),
            ],
            stdout=sink, stderr=subprocess.STDOUT, env=clean_aws_env(),
            start_new_session=True,  # its own process group, as a shell gives a job
        )  # fmt: skip
    try:
        printed = _wait_for_line(out_file, "Ctrl-C to stop", process)
        for token in state_dir.glob("tasks/*/*"):
            if token.name in ("identity.jwt", "authorization-token"):
                assert token.stat().st_mode & 0o777 == 0o600, token
        tries = [line.strip() for line in printed.splitlines() if "aws sts get-caller-id" in line]
        exports = [line.strip() for line in printed.splitlines() if "export AWS_CONT" in line]
        assert len(tries) == len(exports) == 2, printed
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        for tenant, try_line, export in zip(("acme", "globex"), tries, exports, strict=True):
            # As pasted: the IMDS line alone, then the container endpoint's exports.
            container_try = f"{export}; {try_line.replace('AWS_EC2_METADATA_SERVICE', 'X')}"
            for script in (try_line, container_try):
                result = subprocess.run(
                    ["bash", "-c", script], env={**clean_aws_env(), "PATH": path},
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                assert f"assumed-role/{tenant}-app/" in json.loads(result.stdout)["Arn"]
        members = _group_members(process.pid)
        assert len(members) >= 3 + replicas + (replicas > 1), members  # demo, STS, sidecars…
        if replicas > 1:
            _store_asks_for_its_password(printed, state_dir, members)
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
        while _group_members(process.pid) and time.monotonic() - started < 60:
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert not _group_members(process.pid), "a child outlived the demo"
    # Two drained groups (sidecars, brokers), then the store and STS stop quickly.
    assert took < 2 * (drain + 1) + 3, f"stopping took {took:.1f}s"
    out = out_file.read_text()
    assert "killed" not in out, out
    order = ["stopped sidecars (drained", "stopped brokers (drained", "stopped local STS"]
    if replicas > 1:
        order.insert(2, "stopped store")
    positions = [out.index(step) for step in order]
    assert positions == sorted(positions), out
    fleet_dir = state_dir / "audit-fleet"
    audit_dirs = [state_dir / "audit"] if replicas == 1 else sorted(fleet_dir.iterdir())
    public_key = state_dir / "keys" / "audit-keys" / "audit-signing.pub"
    for audit_dir in audit_dirs:
        verify = [sys.executable, "-m", "metaproxy", "audit", "verify", str(audit_dir)]
        verify += ["--public-key", str(public_key)]
        result = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        # The final checkpoint covers the newest segment, so losing it is detected.
        newest = sorted(audit_dir.glob("segment-*.jsonl"))[-1]
        newest.unlink()
        result = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0, f"{audit_dir}: deleting {newest.name} went unnoticed"
