"""The fleet's store key rotated as docs/fleet.md says, and a shared set that does not open.

Two real replicas on a real Valkey/Redis, moto behind the fault proxy (which counts the STS
calls). A set sealed under a key a replica does not have is a miss there: fetched again and
replaced, in one STS call's time, never a wait for a lease nobody holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.credentials.fleet import StoreNames
from metaproxy.broker.credentials.source import Fetch
from metaproxy.broker.server import BrokerServer
from metaproxy.broker.store.sealing import Sealer, generate_key_line
from metaproxy.models import AssumeRoleSpec
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.redis_server import RedisServer
from tests.conftest import record_broker_secrets
from tests.fleet_support import Fleet, ask, control
from tests.support import Pki, issue

SLOWEST_ANSWER = 1.0  # seconds: the issue's bound for any request during a rotation


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as proxy:
        yield proxy


@pytest.fixture
async def fleet(
    tmp_path: Path, pki: Pki, proxy: FaultProxy, policies_dir: Path, redis_server: RedisServer
) -> AsyncIterator[Fleet]:
    fleet = Fleet(
        tmp_path, pki, proxy.url, policies_dir, redis_server.url, on_stop=record_broker_secrets
    )
    yield fleet
    await fleet.stop_all()


def key_file(directory: Path, name: str, *lines: str) -> Path:
    path = directory / f"{name}.key"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def sts_calls(proxy: FaultProxy) -> int:
    return len(proxy.assume_role_timeline())


async def timed_ask(
    https: aiohttp.ClientSession, replica: BrokerServer, token: str
) -> tuple[int, float, str]:
    started = time.monotonic()
    status, body = await ask(https, replica, token)
    key = body.get("credentials", {}).get("access_key_id", "")
    return status, time.monotonic() - started, key


async def test_a_rotation_done_in_two_phases_slows_no_request_and_keeps_revocations(
    fleet: Fleet,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """Replicas restarted one at a time with the new key second, then first: every request is
    answered within a second; a set one replica sealed is read by the other (one STS call per
    task) at every step where both name sets with the same first key — while the swap rolls
    out they file under different names, so each fetches its own; and a revocation made at any
    step reaches the other replica unrefused."""
    old, new = generate_key_line(), generate_key_line()
    steps = [
        ("start", key_file(tmp_path, "old", old), key_file(tmp_path, "old", old)),
        ("phase 1", key_file(tmp_path, "both", old, new), key_file(tmp_path, "old", old)),
        ("phase 1", key_file(tmp_path, "both", old, new), key_file(tmp_path, "both", old, new)),
        ("phase 2", key_file(tmp_path, "new", new, old), key_file(tmp_path, "both", old, new)),
        ("phase 2", key_file(tmp_path, "new", new, old), key_file(tmp_path, "new", new, old)),
    ]
    one = await fleet.start_replica("one", store_key_file=steps[0][1])
    two = await fleet.start_replica("two", store_key_file=steps[0][2])
    answers: list[tuple[str, int, float]] = []
    for number, (phase, first_key, second_key) in enumerate(steps):
        if number:  # roll the replica whose key file changed, as a rollout would
            if first_key != steps[number - 1][1]:
                await fleet.stop(one)
                one = await fleet.start_replica("one", store_key_file=first_key)
            else:
                await fleet.stop(two)
                two = await fleet.start_replica("two", store_key_file=second_key)
        token = issue(pki, f"rotation-{number}", "acme")
        calls = sts_calls(proxy)
        status, seconds, sealed_by_one = await timed_ask(https, one, token)
        answers.append((phase, status, seconds))
        status, seconds, read_by_two = await timed_ask(https, two, token)
        answers.append((phase, status, seconds))
        if first_key.read_text().split()[0] == second_key.read_text().split()[0]:
            assert read_by_two == sealed_by_one, f"{phase}: the other replica fetched its own"
            assert sts_calls(proxy) == calls + 1
        else:  # the swap half rolled out: names differ, each replica fetches once
            assert sts_calls(proxy) == calls + 2
        victim = issue(pki, f"revoked-{number}", "acme")
        assert (await ask(https, two, victim))[0] == 200
        status, _ = await control(
            https, one, "/v1/revocations", {"tenant": "acme", "task": f"revoked-{number}"}
        )
        assert status == 200
        deadline = time.monotonic() + 2.0
        while (await ask(https, two, victim))[0] != 403:
            assert time.monotonic() < deadline, f"{phase}: the revocation did not reach replica two"
            await asyncio.sleep(0.05)
        assert (one.revocations.rejected, two.revocations.rejected) == (0, 0)
    assert {status for _, status, _ in answers} == {200}
    assert max(seconds for _, _, seconds in answers) < SLOWEST_ANSWER, answers


async def test_a_set_sealed_under_a_key_this_replica_lacks_is_a_miss_replaced_at_once(
    fleet: Fleet,
    proxy: FaultProxy,
    https: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """A replica given only the new key (a rotation done in one step) meets a set it cannot
    open: it fetches its own in one STS call's time and replaces the stored one, which the
    next replica with that key then reads; a value tampered with in the store is the same."""
    old, new = generate_key_line(), generate_key_line()
    sealer = await fleet.start_replica(store_key_file=key_file(tmp_path, "old", old))
    lacking = await fleet.start_replica(store_key_file=key_file(tmp_path, "new", new))
    reader = await fleet.start_replica(store_key_file=key_file(tmp_path, "new", new))
    token = issue(pki, "one-step", "acme")
    assert (await ask(https, sealer, token))[0] == 200
    calls = sts_calls(proxy)
    status, seconds, replaced = await timed_ask(https, lacking, token)
    assert (status, sts_calls(proxy)) == (200, calls + 1)
    assert seconds < SLOWEST_ANSWER
    await asyncio.sleep(0.1)  # the fill goes out just after the answer
    status, _, read = await timed_ask(https, reader, token)
    assert (status, read, sts_calls(proxy)) == (200, replaced, calls + 1)

    tampered = issue(pki, "tampered", "acme")
    assert (await ask(https, reader, tampered))[0] == 200
    await asyncio.sleep(0.1)
    keys = [k for k in await redis_keys(redis_server) if "{cache:" in k and k.endswith(":value")]
    assert keys
    for key in keys:
        await redis_set(redis_server, key, b"\x00not a sealed set")
    calls = sts_calls(proxy)
    status, seconds, _ = await timed_ask(https, lacking, tampered)
    assert (status, sts_calls(proxy)) == (200, calls + 1)
    assert seconds < SLOWEST_ANSWER


async def redis_keys(server: RedisServer) -> list[str]:
    import redis.asyncio as redis

    client = redis.Redis.from_url(server.url)
    try:
        return [key.decode() if isinstance(key, bytes) else key for key in await client.keys("*")]
    finally:
        await client.aclose()


async def redis_set(server: RedisServer, key: str, value: bytes) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(server.url)
    try:
        ttl = await client.pttl(key)
        await client.set(key, value, px=ttl if ttl > 0 else 60_000)
    finally:
        await client.aclose()


def test_the_store_names_sets_and_owners_by_keyed_digests() -> None:
    """Without the store key a name cannot be recomputed from a guess: not the plain SHA-256 of
    the cache key, and another key names the same set differently."""
    spec = AssumeRoleSpec("arn:aws:iam::111111111111:role/app", "acme.t1", "acme", 3600)
    fetch = Fetch(spec, "acme", "t1")
    one = StoreNames(Sealer([b"a" * 32]))
    other = StoreNames(Sealer([b"b" * 32]))
    plain = hashlib.sha256(json.dumps(fetch.key, default=str).encode()).hexdigest()
    assert one.of(fetch) not in (plain, other.of(fetch))
    assert one.owner("acme", "t1") != other.owner("acme", "t1")
    assert one.owners_of(fetch) == [one.owner("acme", ""), one.owner("acme", "t1")]
