"""STS's PackedPolicySize: recorded per grant in the audit log and a histogram; when STS refuses
with PackedPolicyTooLarge the caller gets a clear 403 naming the role and the tags, not a 502."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import Pki, audit_records, broker_config, issue

POLICY = """
tenant = "tagged"
team = "payments"

[[identities]]
kind = "platform"
tenant = "tagged"

[[roles]]
arn = "arn:aws:iam::111111111111:role/tagged-app"
default = true
apps = ["*"]

[session]
tags = { team = "${team}", task = "${task}", app = "${app}" }

# end of policy
"""


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def tagged_broker(tmp_path: Path, pki: Pki, proxy: FaultProxy) -> AsyncIterator[BrokerServer]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "tagged.toml").write_text(POLICY)
    server = await BrokerServer.start(broker_config(tmp_path, pki, proxy.url, policies))
    yield server
    await server.aclose()


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, pki: Pki, task: str
) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {issue(pki, task, 'tagged')}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        return answer.status, await answer.json()


async def test_packed_policy_size_is_audited_and_measured(
    tagged_broker: BrokerServer, pki: Pki, https: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The issued record carries STS's PackedPolicySize; the histogram counted the call."""
    status, _ = await ask(https, tagged_broker, pki, "sized-1")
    assert status == 200
    (issued,) = [r for r in audit_records(tmp_path / "audit") if r["event"] == "issued"]
    assert issued["packed_policy_size"] == 6  # what the local STS (moto) answers
    async with https.get(tagged_broker.admin_url + "/metrics") as answer:
        exposition = await answer.text()
    count = next(
        float(line.split()[-1])
        for line in exposition.splitlines()
        if line.startswith("metaproxy_broker_sts_packed_policy_percent_count")
    )
    assert count >= 1


async def test_packed_policy_too_large_is_a_403_naming_the_role_and_tags(
    tagged_broker: BrokerServer,
    pki: Pki,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """STS answering PackedPolicyTooLarge: one call (no retry), a 403 that names the role and
    the tag keys, and an audited failure; not a 502."""
    proxy.set(refuse_code="PackedPolicyTooLarge")
    status, body = await ask(https, tagged_broker, pki, "too-big-1")
    assert status == 403
    assert body["code"] == "PackedPolicyTooLarge"
    message = str(body["message"])
    assert "role tagged-app" in message
    assert "session tags (team, task, app)" in message
    assert len(proxy.assume_role_calls()) == 1
    (failed,) = [r for r in audit_records(tmp_path / "audit") if r["event"] == "failed"]
    assert failed["status"] == 403
    assert "PackedPolicyTooLarge" in str(failed["reason"])
