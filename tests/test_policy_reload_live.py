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
from tests.support import Pki, issue

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
    assert broker.services.policies.generation == 0
    status, body = await credentials(https, broker, issue(pki, "t-reload-2", "acme"))
    assert (status, body["role_name"]) == (200, "acme-app")  # the last good policy serves

    acme.write_text(good.replace("\n" + GOOD_ARN, "\n" + NEW_ARN, 1))
    await wait_for(lambda: broker.services.policies.generation == 1)
    status, body = await credentials(https, broker, token)
    assert status == 200
    assert body["role_name"] == "acme-app-v2"
    assert body["role_arn"] == "arn:aws:iam::111111111111:role/acme-app-v2"
