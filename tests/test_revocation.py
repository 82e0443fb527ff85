"""Revoking a task or a tenant through the control API: the broker refuses it, sidecars drop
it, IAM cuts old sessions; listing and lifting are audited like a revoke."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from metaproxy.broker.server import BrokerServer
from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.revoke_deny import deny_policy
from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory
from tests.support import (
    CONTROL_TOKEN,
    Pki,
    audit_records,
    broker_config,
    container_request,
    control_token_file,
    issue,
    run_command,
)


async def revoke(broker: BrokerServer, pki: Pki, *argv: str) -> tuple[int, str, str]:
    """`metaproxy revoke ARGV...` against the broker's control API, in its own process."""
    token_file = broker.config.control_token_file
    assert token_file is not None
    command = [
        sys.executable,
        *("-m", "metaproxy", "revoke", "--control-url", broker.control_url),
        *("--control-token-file", str(token_file), "--broker-ca-file", str(pki.ca)),
        *argv,
    ]
    return await run_command(*command, env=dict(os.environ), timeout=30)


async def ask(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        await answer.read()
        return answer.status


async def container_status(sidecar: Sidecar) -> int:
    headers = {"Authorization": sidecar.state.authorization_token}
    async with (
        aiohttp.ClientSession() as session,
        session.get(sidecar.container_url + "/v1/credentials", headers=headers) as answer,
    ):
        return answer.status


async def test_revoked_task_is_cut_off_within_the_check_interval(
    broker: BrokerServer,
    start_sidecar: SidecarFactory,
    https: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """After `revoke --tenant --task`, its sidecar answers 503 within the 1 s check."""
    revoked = await start_sidecar("acme", "rev-task", revocation_check_seconds=1.0)
    bystander = await start_sidecar("acme", "rev-bystander", revocation_check_seconds=1.0)
    assert (await container_status(revoked), await container_status(bystander)) == (200, 200)

    rc, out, err = await revoke(broker, pki, "--tenant", "acme", "--task", "rev-task")
    assert rc == 0, err
    revoked_at = time.monotonic()
    assert '"aws:PrincipalTag/task": "rev-task"' in out
    assert '"aws:TokenIssueTime"' in out and '"Effect": "Deny"' in out
    assert "--role-name acme-app" in out
    assert "dropped: 0 from the fleet's shared cache, 1 on the replica asked" in out

    while await container_status(revoked) != 503:
        # Bound: one check interval (1 s) plus a broker round trip.
        assert time.monotonic() - revoked_at < 3.0, "revoked sidecar still serving"
        await asyncio.sleep(0.1)
    assert await container_status(bystander) == 200
    async with aiohttp.ClientSession() as session, session.get(revoked.admin_url + "/readyz") as r:
        assert r.status == 503  # and the task's readiness says so
    assert await ask(https, broker, issue(pki, "rev-task", "acme")) == 403

    records = audit_records(broker.config.audit_dir)
    assert any(r["event"] == "revoked" and r.get("task") == "rev-task" for r in records)
    denied = [r for r in records if r["event"] == "denied" and r.get("task") == "rev-task"]
    assert denied and all(r["status"] == 403 and "revoked" in r["reason"] for r in denied)


async def statuses_of_copies(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> list[bytes]:
    """Two copies of `request` pipelined on a kept-alive connection: their statuses."""
    writer.write(request * 2)
    data = b""
    while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
        data += await asyncio.wait_for(reader.read(65536), 3)
    return [answer[:3] for answer in data.split(b"HTTP/1.1 ")[1:]]


async def test_a_connection_repeating_its_request_is_cut_off_too(
    broker: BrokerServer, start_sidecar: SidecarFactory, pki: Pki
) -> None:
    """A client repeating the same request on one connection (answered from what the sidecar
    noted about it) gets 503 as soon as the revocation reaches the sidecar, like a new one."""
    revoked = await start_sidecar("acme", "rev-repeat", revocation_check_seconds=1.0)
    host, port, request = container_request(revoked)
    reader, writer = await asyncio.open_connection(host, port)
    for _ in range(3):
        assert await statuses_of_copies(reader, writer, request) == [b"200"] * 2
    rc, _, err = await revoke(broker, pki, "--tenant", "acme", "--task", "rev-repeat")
    assert rc == 0, err
    revoked_at = time.monotonic()
    while (statuses := await statuses_of_copies(reader, writer, request)) != [b"503"] * 2:
        assert statuses == [b"200"] * 2
        assert time.monotonic() - revoked_at < 3.0, "revoked sidecar still serving"
        await asyncio.sleep(0.1)
    assert await container_status(revoked) == 503
    writer.close()


async def test_a_task_revocation_spares_the_same_task_name_in_another_tenant(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Revocations are keyed by (tenant, task): globex's `shared-name` keeps working."""
    rc, _, err = await revoke(broker, pki, "--tenant", "acme", "--task", "shared-name")
    assert rc == 0, err
    assert await ask(https, broker, issue(pki, "shared-name", "acme")) == 403
    assert await ask(https, broker, issue(pki, "shared-name", "globex")) == 200


async def test_list_and_lift_are_audited_and_lift_restores_the_task(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """`--list` shows the revocation, `--lift` takes it back; each step is one audit record."""
    assert (await revoke(broker, pki, "--tenant", "globex", "--task", "lift-me"))[0] == 0
    rc, out, err = await revoke(broker, pki, "--list")
    assert rc == 0, err
    assert "globex/lift-me" in out
    assert await ask(https, broker, issue(pki, "lift-me", "globex")) == 403

    rc, out, err = await revoke(broker, pki, "--lift", "--tenant", "globex", "--task", "lift-me")
    assert rc == 0, err
    assert "lifted the revocation of task lift-me of tenant globex" in out
    assert await ask(https, broker, issue(pki, "lift-me", "globex")) == 200
    rc, _, err = await revoke(broker, pki, "--lift", "--tenant", "globex", "--task", "lift-me")
    assert rc == 1 and "404" in err  # nothing left to lift

    events = [
        r["event"]
        for r in audit_records(broker.config.audit_dir)
        if r["event"] in ("revoked", "listed", "lifted")
    ]
    assert events == ["revoked", "listed", "lifted"]


async def test_unknown_tenant_is_an_error_not_a_silent_success(
    broker: BrokerServer, pki: Pki
) -> None:
    """A tenant no policy knows is refused (404) and nothing is recorded."""
    rc, _, err = await revoke(broker, pki, "--tenant", "acmee", "--task", "t1")
    assert rc == 1 and "unknown tenant" in err
    assert broker.revocations.entries() == []


async def test_tenant_revocation_drops_only_its_cache_and_survives_a_restart(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """Revoking a tenant drops its cached sets only, and a restarted broker (same --state-dir)
    still refuses it."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir)
    broker = await BrokerServer.start(config)
    assert await ask(https, broker, issue(pki, "rt-acme", "acme")) == 200
    assert await ask(https, broker, issue(pki, "rt-globex", "globex")) == 200
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    async with https.post(
        broker.control_url + "/v1/revocations", json={"tenant": "globex"}, headers=headers
    ) as answer:
        assert answer.status == 200
        body = await answer.json()
    assert body["dropped"] == {"replica": 1, "shared": 0}  # one broker: no shared layer
    assert body["roles"] == ["arn:aws:iam::222222222222:role/globex-app"]
    assert len(broker.cache) == 1  # acme's set is still cached
    record_secrets(broker)
    await broker.aclose()
    assert (tmp_path / "state" / "revocations.json").exists()

    broker = await BrokerServer.start(config)
    try:
        assert await ask(https, broker, issue(pki, "rt-globex-2", "globex")) == 403
        assert await ask(https, broker, issue(pki, "rt-acme", "acme")) == 200
    finally:
        record_secrets(broker)
        await broker.aclose()


async def test_control_api_needs_its_token_and_audits_refusals(
    broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """No token or a wrong one: 401, audited, nothing revoked."""
    url = broker.control_url + "/v1/revocations"
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        async with https.post(url, json={"tenant": "acme"}, headers=headers) as answer:
            assert answer.status == 401
            assert (await answer.json())["code"] == "Unauthenticated"
    assert broker.revocations.entries() == []
    refusals = [
        r
        for r in audit_records(broker.config.audit_dir)
        if r.get("rule") == "control-authentication"
    ]
    assert [r["status"] for r in refusals] == [401, 401]
    assert CONTROL_TOKEN not in json.dumps(refusals)


async def test_control_api_validates_its_input(
    broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """Anything but {"tenant"} or {"tenant", "task"} is a 400 and revokes nothing."""
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    bodies: list[object] = [
        {"task": "a"},
        {"tenant": ""},
        {"tenant": None},
        {"tenant": "acme", "task": ""},
        {"tenant": "acme", "other": 1},
        ["tenant"],
        {},
    ]
    for body in bodies:
        async with https.post(
            broker.control_url + "/v1/revocations", json=body, headers=headers
        ) as answer:
            assert answer.status == 400, body
    assert broker.revocations.entries() == []


async def test_admin_port_changes_nothing(broker: BrokerServer) -> None:
    """The old admin revoke route is gone: the admin port only reads."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(broker.admin_url + "/v1/revoke", json={"tenant": "acme"}) as answer,
    ):
        assert answer.status in (404, 405)
    assert broker.revocations.entries() == []


async def test_revoke_cli_reports_errors(tmp_path: Path) -> None:
    """A bad name exits 2; an unreachable broker exits 1 with one line, not a traceback."""
    token = control_token_file(tmp_path)
    base = [sys.executable, "-m", "metaproxy", "revoke", "--control-token-file", str(token)]
    url = ["--control-url", "http://127.0.0.1:9"]
    env = dict(os.environ)
    rc, _, err = await run_command(*base, *url, "--tenant", "acme", "--task", "bad\nname", env=env)
    assert rc == 2 and "printable" in err
    rc, _, err = await run_command(*base, *url, "--task", "t", env=env)
    assert rc == 2 and "--tenant is required" in err
    rc, _, err = await run_command(*base, *url, "--tenant", "acme", env=env)
    assert rc == 1 and "Traceback" not in err and "cannot reach" in err


def test_deny_policy_matches_the_session_tag_as_the_broker_sets_it() -> None:
    """`batch#42` is tagged `batch-42` on its sessions, so the deny names `batch-42`."""
    from tests.support import REPO

    acme = load_policy_dir(REPO / "policies").tenants["acme"]
    policy = deny_policy(acme, "batch#42", "2026-03-04T14:02:03Z")
    assert policy is not None
    statement = policy["Statement"][0]
    assert statement["Effect"] == "Deny"
    assert (statement["Action"], statement["Resource"]) == ("*", "*")
    assert statement["Condition"] == {
        "DateLessThan": {"aws:TokenIssueTime": "2026-03-04T14:02:03Z"},
        "StringEquals": {"aws:PrincipalTag/task": "batch-42"},
    }
    tenant_wide = deny_policy(acme, "", "2026-03-04T14:02:03Z")
    assert tenant_wide is not None
    assert tenant_wide["Statement"][0]["Condition"]["StringEquals"] == {
        "aws:PrincipalTag/tenant": "acme"
    }
