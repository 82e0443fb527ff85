"""Revoking a task or a tenant: the broker refuses it, sidecars drop it, IAM cuts old sessions."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from metaproxy import cli
from metaproxy.broker.server import BrokerServer
from metaproxy.revoke_cli import deny_policy
from metaproxy.sidecar.server import SidecarServer
from tests.conftest import SidecarFactory
from tests.support import Pki, audit_records, broker_config, issue, run_command

# Until `metaproxy.revoke_cli` is in cli.COMMAND_MODULES, run it through the same register().
_REVOKE_MAIN = (
    "import argparse, sys\n"
    "from metaproxy import revoke_cli\n"
    "parser = argparse.ArgumentParser(prog='metaproxy')\n"
    "revoke_cli.register(parser.add_subparsers(required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


async def revoke(*argv: str) -> tuple[int, str, str]:
    """`metaproxy revoke ARGV...` in its own process, as an operator would run it."""
    if "metaproxy.revoke_cli" in cli.COMMAND_MODULES:
        command = [sys.executable, "-m", "metaproxy", "revoke", *argv]
    else:
        command = [sys.executable, "-c", _REVOKE_MAIN, "revoke", *argv]
    return await run_command(*command, env=dict(os.environ), timeout=30)


async def ask(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        await answer.read()
        return answer.status


async def container_status(sidecar: SidecarServer) -> int:
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
    """After `revoke --task`, its sidecar answers 503 within the 1 s check; others keep serving."""
    revoked = await start_sidecar("acme", "rev-task", revocation_check_seconds=1.0)
    bystander = await start_sidecar("acme", "rev-bystander", revocation_check_seconds=1.0)
    assert (await container_status(revoked), await container_status(bystander)) == (200, 200)

    rc, out, err = await revoke("--task", "rev-task", "--broker-admin", broker.admin_url)
    assert rc == 0, err
    revoked_at = time.monotonic()
    assert '"aws:PrincipalTag/task": "rev-task"' in out
    assert '"aws:TokenIssueTime"' in out and '"Effect": "Deny"' in out
    assert "--role-name acme-app" in out
    assert "1 cached credential sets dropped" in out

    while await container_status(revoked) != 503:
        # Bound: one check interval (1 s) plus a broker round trip.
        assert time.monotonic() - revoked_at < 3.0, "revoked sidecar still serving"
        await asyncio.sleep(0.1)
    assert await container_status(bystander) == 200
    async with aiohttp.ClientSession() as session, session.get(revoked.admin_url + "/readyz") as r:
        assert r.status == 503  # and the task's readiness says so
    assert await ask(https, broker, issue(pki, "rev-task", "acme")) == 403

    records = audit_records(broker.services.config.audit_dir)
    assert any(r["event"] == "revoked" and r.get("task") == "rev-task" for r in records)
    denied = [r for r in records if r["event"] == "denied" and r.get("task") == "rev-task"]
    assert denied and all(r["status"] == 403 and "revoked" in r["reason"] for r in denied)


async def test_tenant_revocation_drops_only_its_cache_and_survives_a_restart(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """Revoking a tenant drops its cached sets only, and a restarted broker still refuses it."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir)
    broker = await BrokerServer.start(config)
    assert await ask(https, broker, issue(pki, "rt-acme", "acme")) == 200
    assert await ask(https, broker, issue(pki, "rt-globex", "globex")) == 200
    async with (
        aiohttp.ClientSession() as session,
        session.post(broker.admin_url + "/v1/revoke", json={"tenant": "globex"}) as answer,
    ):
        assert answer.status == 200
        body = await answer.json()
    assert body["dropped"] == 1
    assert body["roles"] == ["arn:aws:iam::222222222222:role/globex-app"]
    assert len(broker.services.issuer.cache) == 1  # acme's set is still cached
    record_secrets(broker)
    await broker.stop()

    broker = await BrokerServer.start(config)
    try:
        assert await ask(https, broker, issue(pki, "rt-globex-2", "globex")) == 403
        assert await ask(https, broker, issue(pki, "rt-acme", "acme")) == 200
    finally:
        record_secrets(broker)
        await broker.stop()


async def test_revoke_admin_api_validates_its_input(broker: BrokerServer) -> None:
    """Anything but {"task": ID} or {"tenant": NAME} is a 400 and revokes nothing."""
    async with aiohttp.ClientSession() as session:
        for body in ({"task": ""}, {"task": None}, {"task": "a", "tenant": "b"}, ["task"], {}):
            async with session.post(broker.admin_url + "/v1/revoke", json=body) as answer:
                assert answer.status == 400, body
    assert broker.services.revocations.entries() == []


async def test_revoke_cli_reports_errors() -> None:
    """A bad name exits 2; an unreachable broker exits 1 with a message, not a traceback."""
    rc, _, err = await revoke("--task", "bad\nname", "--broker-admin", "http://127.0.0.1:9")
    assert rc == 2 and "printable" in err
    rc, _, err = await revoke("--tenant", "acme", "--broker-admin", "http://127.0.0.1:9")
    assert rc == 1 and "Traceback" not in err and "refused" in err.lower()


def test_deny_policy_scopes_by_issue_time_and_principal_tag() -> None:
    """The printed deny covers sessions issued before the revocation, for that tenant only."""
    statement = deny_policy("tenant", "acme", "2026-03-04T14:02:03Z")["Statement"][0]
    assert statement["Effect"] == "Deny"
    assert (statement["Action"], statement["Resource"]) == ("*", "*")
    assert statement["Condition"] == {
        "DateLessThan": {"aws:TokenIssueTime": "2026-03-04T14:02:03Z"},
        "StringEquals": {"aws:PrincipalTag/tenant": "acme"},
    }
