"""Broker replicas act as one through a real Valkey/Redis store: revocations, staleness,
the shared cache and its single flight, and a store that never holds a secret."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.common import write_tenant_policies
from metaproxy.broker.server import BrokerServer
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.redis_server import RedisServer
from tests.conftest import ISSUED_SECRETS, record_broker_secrets
from tests.fleet_support import Fleet, ask, control
from tests.support import Pki, audit_records, issue, scrape, value


@pytest.fixture
async def fleet(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, redis_server: RedisServer
) -> AsyncIterator[Fleet]:
    fleet = Fleet(
        tmp_path, pki, sts_url, policies_dir, redis_server.url, on_stop=record_broker_secrets
    )
    yield fleet
    await fleet.stop_all()


def records(replica: BrokerServer, event: str) -> list[dict[str, object]]:
    return [r for r in audit_records(replica.config.audit_dir) if r["event"] == event]


@pytest.mark.serial  # asserts the revocation reaches the others within 1 s
async def test_a_revocation_through_one_replica_reaches_every_replica_and_outlives_restarts(
    fleet: Fleet, redis_server: RedisServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Revoked through replica 1: 2 and 3 refuse within 1 s, a 4th refuses on its first request,
    the store's and replicas' restarts keep it, --lift restores it; another tenant's task of the
    same name is untouched; each step is one audit record."""
    one, two, three = [await fleet.start_replica() for _ in range(3)]
    token = issue(pki, "batch-7", "acme")
    other = issue(pki, "batch-7", "globex")
    for replica in (one, two, three):
        assert (await ask(https, replica, token))[0] == 200

    status, body = await control(
        https, one, "/v1/revocations", {"tenant": "acme", "task": "batch-7"}
    )
    assert status == 200, body
    revoked_at = time.monotonic()
    for replica in (two, three):
        while (await ask(https, replica, token))[0] != 403:
            assert time.monotonic() - revoked_at < 1.0, f"{replica.url} still issuing"
            await asyncio.sleep(0.02)
    assert (await ask(https, one, token))[0] == 403
    assert (await ask(https, two, other))[0] == 200  # globex's batch-7 is another task

    four = await fleet.start_replica()
    assert (await ask(https, four, token))[0] == 403

    # The store restarts (its AOF replays), then every replica restarts.
    redis_server.stop()
    redis_server.restart()
    await fleet.stop_all()
    one, two = [await fleet.start_replica() for _ in range(2)]
    assert (await ask(https, one, token))[0] == 403
    assert (await ask(https, two, token))[0] == 403

    status, body = await control(
        https, two, "/v1/revocations/lift", {"tenant": "acme", "task": "batch-7"}
    )
    assert status == 200, body
    deadline = time.monotonic() + 2.0
    while (await ask(https, one, token))[0] != 200:
        assert time.monotonic() < deadline, "lift did not reach replica 1"
        await asyncio.sleep(0.02)

    revoked = [r for d in fleet.tmp.glob("replica-*/audit") for r in _events(d, "revoked")]
    lifted = [r for d in fleet.tmp.glob("replica-*/audit") for r in _events(d, "lifted")]
    assert len(revoked) == 1 and len(lifted) == 1
    assert revoked[0]["task"] == "batch-7" and revoked[0]["tenant"] == "acme"


def _events(audit_dir: Path, event: str) -> list[dict[str, object]]:
    return [r for r in audit_records(audit_dir) if r["event"] == event]


async def test_a_replica_that_lost_the_store_fails_closed_past_the_staleness_limit(
    fleet: Fleet, redis_server: RedisServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Store stopped: answers from what it holds, then past the limit 503 + Retry-After,
    audited; the store back, issuance resumes without a restart."""
    replica = await fleet.start_replica(revocation_max_staleness=2.0)
    token = issue(pki, "stale-1", "acme")
    assert (await ask(https, replica, token))[0] == 200
    up = await fleet_gauges(replica)
    assert (up["store_up"], up["live_replicas"]) == (1.0, 1.0)
    assert up["revocation_view_age_seconds"] < 2.0

    redis_server.stop()
    stopped = time.monotonic()
    status, _ = await ask(https, replica, token)
    assert status == 200  # within the limit: from what it holds
    while True:
        status, body = await ask(https, replica, token)
        if status == 503:
            break
        assert time.monotonic() - stopped < 5.0, "still issuing past the staleness limit"
        await asyncio.sleep(0.1)
    assert body["code"] == "RevocationsStale" and body["_retry_after"]
    failed = records(replica, "failed")
    assert failed and "revocation view" in str(failed[-1]["reason"])
    down = await fleet_gauges(replica)
    assert down["store_up"] == 0.0 and down["revocation_view_age_seconds"] >= 2.0

    redis_server.restart()
    deadline = time.monotonic() + 5.0
    while (await ask(https, replica, token))[0] != 200:
        assert time.monotonic() < deadline, "issuance did not resume with the store back"
        await asyncio.sleep(0.1)
    back = await fleet_gauges(replica)
    assert back["store_up"] == 1.0 and back["revocation_view_age_seconds"] < 2.0


async def fleet_gauges(replica: BrokerServer) -> dict[str, float]:
    """The replica's fleet gauges, as its admin port's /metrics shows them now."""
    samples = await scrape(replica.admin_url)
    names = ("store_up", "live_replicas", "revocation_view_age_seconds")
    return {name: value(samples, f"metaproxy_broker_{name}") for name in names}


@pytest.mark.serial  # asserts 200 requests must all arrive within one 0.3 s STS call
async def test_identical_cold_requests_across_replicas_are_one_sts_call(
    fleet: Fleet, sts_url: str, https: aiohttp.ClientSession, pki: Pki, redis_server: RedisServer
) -> None:
    """200 identical cold requests over three replicas: one AssumeRole, one set of credentials;
    the store then holds no secret key, session token or identity token."""
    # Limits out of the way: one identity asking 200 times at once is the point here.
    fleet.policies_dir = write_tenant_policies(fleet.tmp / "unlimited", ["t1"])
    async with FaultProxy(sts_url) as proxy:
        proxy.set(latency=0.3)  # long enough that every request arrives while the call is out
        replicas = [await fleet.start_replica(sts_endpoint=proxy.url) for _ in range(3)]
        token = issue(pki, "same-1", "t1")
        answers = await asyncio.gather(*(ask(https, replicas[i % 3], token) for i in range(200)))
        assert {status for status, _ in answers} == {200}
        keys = {body["credentials"]["access_key_id"] for _, body in answers}
        assert len(keys) == 1
        assert len(proxy.assume_role_timeline()) == 1

    dump = await _dump_store(redis_server.url)
    secrets = {body["credentials"]["secret_access_key"] for _, body in answers} | {
        body["credentials"]["session_token"] for _, body in answers
    }
    for secret in [*secrets, token, *ISSUED_SECRETS]:
        assert secret.encode() not in dump


def as_bytes(reply: object) -> bytes:
    """redis-py types its replies as unions of every shape a command may take; a client without
    decode_responses gets bytes for keys, values and members."""
    assert isinstance(reply, bytes), reply
    return reply


async def _dump_store(url: str) -> bytes:
    """Every key and value in the store, as bytes (strings, hashes, sets, sorted sets)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    parts: list[bytes] = []
    try:
        async for key in client.scan_iter(count=1000):
            parts.append(as_bytes(key))
            kind = as_bytes(await client.type(key)).decode()
            if kind == "string":
                parts.append(as_bytes(await client.get(key) or b""))
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    parts += [as_bytes(field), as_bytes(value)]
            elif kind == "set":
                parts += [as_bytes(member) for member in await client.smembers(key)]
            elif kind == "zset":
                parts += [as_bytes(member) for member in await client.zrange(key, 0, -1)]
    finally:
        await client.aclose()
    assert parts, "the store is empty: nothing was checked"
    return b"\n".join(parts)


async def test_deleting_a_replicas_audit_chain_from_s3_fails_fleet_verification(
    fleet: Fleet, sts_url: str, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Each replica ships its chain under the fleet prefix and witnesses the others': with one
    replica's whole prefix deleted, `audit verify` over the prefix fails and names it."""
    import boto3

    from metaproxy.audit.fleet import verify_fleet_s3
    from metaproxy.audit.ship import s3_client_factory

    s3 = boto3.client("s3", endpoint_url=sts_url, region_name="us-east-1")
    s3.create_bucket(Bucket="fleet-audit")
    options = {"audit_s3_url": "s3://fleet-audit/fleet", "s3_endpoint": sts_url}
    replicas = [await fleet.start_replica(**options) for _ in range(3)]
    for n, replica in enumerate(replicas):
        assert (await ask(https, replica, issue(pki, f"witnessed-{n}", "acme")))[0] == 200
    # In order: each closing checkpoint witnesses the replicas that closed before it.
    for replica in replicas:
        await fleet.stop(replica)

    factory = s3_client_factory(sts_url, "us-east-1")
    public = pki.audit_pub
    report = await asyncio.to_thread(verify_fleet_s3, "s3://fleet-audit/fleet", public, factory)
    assert report.ok, report.problems
    assert len(report.replicas) == 3 and report.witnessed > 0

    listed = s3.list_objects_v2(Bucket="fleet-audit", Prefix="fleet/replica-1/")
    for item in listed["Contents"]:
        s3.delete_object(Bucket="fleet-audit", Key=item["Key"])
    report = await asyncio.to_thread(verify_fleet_s3, "s3://fleet-audit/fleet", public, factory)
    assert not report.ok
    assert any(p.startswith("replica broker-replica-1: chain missing") for p in report.problems), (
        report.problems
    )
