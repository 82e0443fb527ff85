"""A revocation covers what is already in flight.

Against a real broker, moto behind the fault proxy (STS latency 2 s, budget 1 call/s): a task
revoked while its cold request waits — at STS, or still in the queue behind another task's
call — gets no credentials at all: the request is refused (403, audited), what STS minted after
the revocation is never served or cached, a queued call is never sent, and the printed IAM deny
reaches past anything the fleet could still have handed out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.redis_server import RedisServer
from tests.conftest import record_broker_secrets
from tests.fleet_support import Fleet, control
from tests.support import Pki, audit_records, broker_config, issue

LATENCY = 2.0


@pytest.fixture
async def slow_sts(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as proxy:
        proxy.set(latency=LATENCY)
        yield proxy


@pytest.fixture
async def broker_on_slow_sts(
    tmp_path: Path, pki: Pki, slow_sts: FaultProxy, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    config = broker_config(
        tmp_path, pki, slow_sts.url, policies_dir, sts_budget_per_second=1.0, sts_timeout=5.0
    )
    server = await BrokerServer.start(config)
    yield server
    record_broker_secrets(server)
    await server.aclose()


async def ask(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        return answer.status, await answer.json()


def events(broker: BrokerServer, task: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(broker.config.audit_dir) if r.get("task") == task]


async def test_a_task_revoked_while_sts_answers_gets_nothing(
    broker_on_slow_sts: BrokerServer,
    slow_sts: FaultProxy,
    https: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """Revoked 0.5 s into a 2 s STS call: 403, no `issued` record, nothing cached, and the
    deny's cut-off is later than the call STS completed after the revocation."""
    broker = broker_on_slow_sts
    pending = asyncio.ensure_future(ask(https, broker, issue(pki, "in-flight", "acme")))
    await asyncio.sleep(0.5)
    assert len(slow_sts.assume_role_calls()) == 1  # at STS now
    status, answer = await control(
        https, broker, "/v1/revocations", {"tenant": "acme", "task": "in-flight"}
    )
    assert status == 200
    revoked_wall = datetime.now(UTC)
    code, body = await pending
    assert code == 403 and "AccessKeyId" not in str(body)
    recorded = {r["event"]: r for r in events(broker, "in-flight")}
    assert sorted(recorded) == ["denied", "revoked"]  # and never `issued`
    assert "while its credentials were being fetched" in recorded["denied"]["reason"]
    assert broker.cache.entries() == []
    cutoff = datetime.strptime(answer["deny_covers_sessions_issued_before"], "%Y-%m-%dT%H:%M:%SZ")
    assert cutoff.replace(tzinfo=UTC) > revoked_wall  # covers what STS minted after it


@pytest.mark.serial  # asserts a refusal within 1 s
async def test_a_queued_call_of_a_revoked_task_is_never_sent(
    broker_on_slow_sts: BrokerServer,
    slow_sts: FaultProxy,
    https: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """Behind another task's call (budget 1/s), the revoked task's call waits in the queue; the
    revocation cancels it there: STS never sees it, and the other task is unaffected."""
    broker = broker_on_slow_sts
    first = asyncio.ensure_future(ask(https, broker, issue(pki, "ahead", "acme")))
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(ask(https, broker, issue(pki, "queued", "acme")))
    await asyncio.sleep(0.3)
    status, _ = await control(
        https, broker, "/v1/revocations", {"tenant": "acme", "task": "queued"}
    )
    assert status == 200
    started = time.monotonic()
    assert (await second)[0] == 403
    assert time.monotonic() - started < 1.0  # refused at once, not after its turn
    assert (await first)[0] == 200
    await asyncio.sleep(LATENCY)  # any call it would have made has had its time
    sessions = [call.params.get("RoleSessionName", "") for call in slow_sts.assume_role_calls()]
    assert [s for s in sessions if "queued" in s] == []


@pytest.fixture
async def fleet_on_slow_sts(
    tmp_path: Path,
    pki: Pki,
    slow_sts: FaultProxy,
    policies_dir: Path,
    redis_server: RedisServer,
) -> AsyncIterator[Fleet]:
    fleet = Fleet(
        tmp_path, pki, slow_sts.url, policies_dir, redis_server.url, on_stop=record_broker_secrets
    )
    yield fleet
    await fleet.stop_all()


async def test_no_replica_fills_the_shared_cache_after_the_revocation(
    fleet_on_slow_sts: Fleet, slow_sts: FaultProxy, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """The replica holding the fleet's lease hears of the revocation (made through another
    replica) before STS answers: it refuses, and the shared cache stays empty for the task."""
    one = await fleet_on_slow_sts.start_replica(sts_budget_per_second=1.0)
    two = await fleet_on_slow_sts.start_replica(sts_budget_per_second=1.0)
    token = issue(pki, "fleet-in-flight", "acme")
    pending = asyncio.ensure_future(ask(https, two, token))
    await asyncio.sleep(0.5)
    status, _ = await control(
        https, one, "/v1/revocations", {"tenant": "acme", "task": "fleet-in-flight"}
    )
    assert status == 200
    assert (await pending)[0] == 403
    await asyncio.sleep(0.2)  # a fill would have gone out 2 ms after the answer
    shared = two.fleet_cache
    assert shared is not None
    # The lifted task's next request must find nothing another replica cached for it.
    await control(https, one, "/v1/revocations/lift", {"tenant": "acme", "task": "fleet-in-flight"})
    await asyncio.sleep(0.3)
    calls_before = len(slow_sts.assume_role_calls())
    assert (await ask(https, one, token))[0] == 200
    assert len(slow_sts.assume_role_calls()) == calls_before + 1  # a new set, not a cached one
