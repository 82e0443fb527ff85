"""A policy file broken while the broker runs: the reload is refused with file, line and field,
the last good policy keeps serving, and the fixed file is picked up."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.testing.faultproxy import FaultProxy
from tests.conftest import record_broker_secrets
from tests.support import Pki, broker_config, issue

GOOD_ARN = 'arn = "arn:aws:iam::111111111111:role/acme-app"'
BAD_ARN = 'arn = "arn:aws:iam::1111:role/acme-app"'
NEW_ARN = 'arn = "arn:aws:iam::111111111111:role/acme-app-v2"'


async def credentials(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str
) -> tuple[int, dict[str, Any]]:
    async with https.post(
        broker.url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.json()


def problem_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "policy problem" in r.getMessage()]


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_invalid_edit_is_refused_and_the_fix_is_picked_up(
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    pki: Pki,
    policies_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Broken: refused, logged as file:line: field, old role still issued. Fixed: new role."""
    caplog.set_level(logging.INFO, logger="metaproxy.policy")
    token = issue(pki, "t-reload", "acme")
    status, body = await credentials(https, broker, token)
    assert (status, body["role_name"]) == (200, "acme-app")

    acme = policies_dir / "acme.toml"
    good = acme.read_text()
    bad_line = good.splitlines().index(GOOD_ARN) + 1
    acme.write_text(good.replace("\n" + GOOD_ARN, "\n" + BAD_ARN, 1))
    # The reload runs on a worker thread and logs "reload refused" before each problem: wait
    # for the problem itself, not for the first line.
    problem = re.compile(rf"policy problem: .*acme\.toml:{bad_line}: roles\[0\]\.arn: ")
    await wait_for(lambda: any(problem.search(r.getMessage()) for r in caplog.records))
    assert any("reload refused" in r.getMessage() for r in caplog.records)
    assert broker.policies.generation == 0
    status, body = await credentials(https, broker, issue(pki, "t-reload-2", "acme"))
    assert (status, body["role_name"]) == (200, "acme-app")  # the last good policy serves

    acme.write_text(good.replace("\n" + GOOD_ARN, "\n" + NEW_ARN, 1))
    await wait_for(lambda: broker.policies.generation == 1)
    status, body = await credentials(https, broker, token)
    assert status == 200
    assert body["role_name"] == "acme-app-v2"
    assert body["role_arn"] == "arn:aws:iam::111111111111:role/acme-app-v2"


async def test_a_cut_policy_left_on_disk_is_refused_and_the_role_keeps_its_scope(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """acme.toml cut before its role's session policy and left there (valid TOML, stable on
    disk): the broker refuses it at file:line: field, and acme-app is still assumed at STS with
    the session policy and the session tags of the last good set."""
    caplog.set_level(logging.INFO, logger="metaproxy.policy")
    async with FaultProxy(sts_url) as proxy:
        broker = await BrokerServer.start(broker_config(tmp_path, pki, proxy.url, policies_dir))
        try:
            acme = policies_dir / "acme.toml"
            text = acme.read_text()
            cut = text[: text.index("session_policy = '''", text.index("\ntenant ="))]
            acme.write_text(cut)
            store = broker.policies
            await wait_for(
                lambda: (
                    store.generation > 0
                    or any("reload refused" in r.getMessage() for r in caplog.records)
                )
            )
            await asyncio.sleep(1.0)  # five more polls of a file that no longer changes
            status, body = await credentials(https, broker, issue(pki, "t-cut", "acme"))
            generation = store.generation
        finally:
            record_broker_secrets(broker)
            await broker.aclose()
    [call] = proxy.assume_role_calls()
    assert "acme-data/t-cut/*" in call.params.get("Policy", "")
    assert (status, body["role_name"], generation) == (200, "acme-app", 0)
    assert call.tags() == {"tenant": "acme", "task": "t-cut", "app": "web", "team": "payments"}
    where = f"acme.toml:{cut.count(chr(10))}: roles[0].duration_seconds: incomplete file"
    assert any(where in problem for problem in problem_lines(caplog)), problem_lines(caplog)
