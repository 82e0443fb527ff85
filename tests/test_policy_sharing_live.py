"""Roles bound to tenants in a running broker (and moto as STS): a reload that hands one
tenant's role to another is refused with file, line and field while the last good set serves,
and tenants that share a role by agreement each get their own sessions, never the other's
cached credentials."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.policy.load import END_LINE
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.redis_server import RedisServer
from tests.conftest import record_broker_secrets
from tests.fleet_support import Fleet
from tests.support import (
    Pki,
    audit_records,
    broker_config,
    caller_identity,
    clean_aws_env,
    issue,
)

ACME_APP = "arn:aws:iam::111111111111:role/acme-app"
GLOBEX_APP = "arn:aws:iam::222222222222:role/globex-app"
SHARED = "arn:aws:iam::333333333333:role/reporting"


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        return answer.status, await answer.json()


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def sharing_policy(tenant: str, partner: str) -> str:
    """`tenant` with SHARED as its only role, shared with `partner`; no session tags, so two
    tenants' AssumeRole calls differ only where their templates make them differ."""
    return f"""tenant = "{tenant}"
team = "reports"

[[identities]]
kind = "platform"
tenant = "{tenant}"

[[roles]]
arn = "{SHARED}"
default = true
apps = ["*"]

[session]
name = "${{tenant}}.${{task}}"
source_identity = "${{tenant}}.${{task}}"

[shared_roles]
"{SHARED}" = ["{partner}"]

{END_LINE}
"""


async def test_a_reload_naming_another_tenants_role_is_refused_and_the_last_good_set_serves(
    broker: BrokerServer,
    https: aiohttp.ClientSession,
    pki: Pki,
    policies_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """globex.toml edited to name acme's role: the reload is refused at globex.toml's line and
    field, and globex's tasks keep getting globex-app, acme's acme-app."""
    caplog.set_level(logging.INFO, logger="metaproxy.policy")
    globex = policies_dir / "globex.toml"
    globex.write_text(globex.read_text().replace(GLOBEX_APP, ACME_APP))
    line = next(n for n, text in enumerate(globex.read_text().splitlines(), 1) if ACME_APP in text)
    store = broker.policies
    where = f"globex.toml:{line}: roles[0].arn: {ACME_APP} belongs to tenant acme"

    def problems() -> list[str]:
        return [r.getMessage() for r in caplog.records if "policy problem" in r.getMessage()]

    await wait_for(lambda: store.generation > 0 or any(where in p for p in problems()))
    status, body = await ask(https, broker, issue(pki, "t-1", "globex"))
    assert (status, body["role_arn"]) == (200, GLOBEX_APP)
    status, body = await ask(https, broker, issue(pki, "t-1", "acme"))
    assert (status, body["role_arn"]) == (200, ACME_APP)
    assert store.generation == 0
    assert any(where in problem for problem in problems()), problems()


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as fault_proxy:
        yield fault_proxy


def sharing_policies(directory: Path, tenants: tuple[str, str]) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    first, second = tenants
    (directory / f"{first}.toml").write_text(sharing_policy(first, second))
    (directory / f"{second}.toml").write_text(sharing_policy(second, first))
    return directory


async def sharing_broker(
    tmp_path: Path, pki: Pki, proxy: FaultProxy, tenants: tuple[str, str]
) -> BrokerServer:
    policies = sharing_policies(tmp_path / "policies", tenants)
    return await BrokerServer.start(broker_config(tmp_path, pki, proxy.url, policies))


async def test_two_tenants_sharing_a_role_get_their_own_sessions(
    tmp_path: Path, pki: Pki, proxy: FaultProxy, sts_url: str, https: aiohttp.ClientSession
) -> None:
    """acme and globex share `reporting` by agreement; the same task id in each gets its own
    STS session, named after its own tenant, as STS itself reports it."""
    broker = await sharing_broker(tmp_path, pki, proxy, ("acme", "globex"))
    try:
        answers = {
            tenant: await ask(https, broker, issue(pki, "t-1", tenant))
            for tenant in ("acme", "globex")
        }
    finally:
        record_broker_secrets(broker)
        await broker.aclose()
    assert {tenant: status for tenant, (status, _) in answers.items()} == {
        "acme": 200,
        "globex": 200,
    }
    sessions = [call.params["RoleSessionName"] for call in proxy.assume_role_calls()]
    assert sessions == ["acme.t-1", "globex.t-1"]
    for tenant, (_, body) in answers.items():
        credentials = body["credentials"]
        identity = await caller_identity(
            sts_url,
            clean_aws_env(
                AWS_ACCESS_KEY_ID=credentials["access_key_id"],
                AWS_SECRET_ACCESS_KEY=credentials["secret_access_key"],
                AWS_SESSION_TOKEN=credentials["session_token"],
            ),
        )
        assert identity["Arn"] == f"arn:aws:sts::333333333333:assumed-role/reporting/{tenant}.t-1"


async def test_a_tenant_is_never_served_another_tenants_cached_credentials(
    tmp_path: Path, pki: Pki, proxy: FaultProxy, https: aiohttp.ClientSession
) -> None:
    """Tenants `acme` (task `eu.t1`) and `acme.eu` (task `t1`) share a role and both render
    session `acme.eu.t1`: the second is not served the first's cached set but gets its own
    from STS, because the tenant is part of the cache key."""
    broker = await sharing_broker(tmp_path, pki, proxy, ("acme", "acme.eu"))
    try:
        first_status, first = await ask(https, broker, issue(pki, "eu.t1", "acme"))
        second_status, second = await ask(https, broker, issue(pki, "t1", "acme.eu"))
    finally:
        record_broker_secrets(broker)
        await broker.aclose()
    assert (first_status, second_status) == (200, 200)
    calls = proxy.assume_role_calls()
    assert [call.params["RoleSessionName"] for call in calls] == ["acme.eu.t1", "acme.eu.t1"]
    keys = [answer["credentials"]["access_key_id"] for answer in (first, second)]
    assert keys[0] != keys[1]
    issued = {
        record["tenant"]: record["reason"]
        for record in audit_records(tmp_path / "audit")
        if record["event"] == "issued"
    }
    assert issued["acme.eu"].endswith("(from sts)"), issued


async def test_the_fleets_shared_cache_keeps_each_tenants_credentials_apart(
    tmp_path: Path,
    pki: Pki,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    """Two replicas and one Valkey/Redis: `acme`'s set, cached in the store by replica 1, is
    not what replica 2 serves `acme.eu` for the same session name; the store holds two
    entries, one per tenant."""
    policies = sharing_policies(tmp_path / "policies", ("acme", "acme.eu"))
    fleet = Fleet(
        tmp_path, pki, proxy.url, policies, redis_server.url, on_stop=record_broker_secrets
    )
    try:
        first_replica, second_replica = [await fleet.start_replica() for _ in range(2)]
        first_status, first = await ask(https, first_replica, issue(pki, "eu.t1", "acme"))
        second_status, second = await ask(https, second_replica, issue(pki, "t1", "acme.eu"))
    finally:
        await fleet.stop_all()
    assert (first_status, second_status) == (200, 200)
    assert len(proxy.assume_role_calls()) == 2
    assert first["credentials"]["access_key_id"] != second["credentials"]["access_key_id"]
    assert len(await cache_values(redis_server.url)) == 2


async def cache_values(url: str) -> list[bytes]:
    """The names of the shared cache's credential values in the store."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        return [key async for key in client.scan_iter(match="metaproxy:{cache:*}:value")]
    finally:
        await client.aclose()
