"""bench/cold_start.py on a short run: its counting of credentials, failures and STS calls, and
its timing from the scheduled send, through real brokers, moto's STS and the fault proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cold_start import TENANTS, Setup, arrivals, measure
from bench.fleet_harness import make_fleet_files
from metaproxy.testing.emulator import StsEmulator
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.redis_server import RedisServer

pytestmark = pytest.mark.slow

TASKS = 50
STS_LATENCY = 0.1


@pytest.fixture(scope="module")
def sts() -> Iterator[str]:
    with StsEmulator(sts_only=True) as emulator:
        yield emulator.url


@pytest.mark.parametrize("replicas", [1, 3], ids=["one-broker-in-memory", "three-on-the-store"])
async def test_every_distinct_task_gets_credentials_from_one_sts_call_of_its_own(
    tmp_path: Path, sts: str, request: pytest.FixtureRequest, replicas: int
) -> None:
    """50 tasks at 200/s: 50 credentials, no failure, 50 AssumeRole calls with 50 session
    names, and no task faster than the STS latency it had to wait for."""
    files = make_fleet_files(tmp_path / "files", TENANTS)
    store = "memory"
    if replicas > 1:
        redis: RedisServer = request.getfixturevalue("redis_server")
        store = redis.url
    async with FaultProxy(sts) as proxy:
        run = await measure(
            Setup("short", replicas, store),
            "short",
            files,
            proxy,
            arrivals(files, "short", TASKS, replicas),
            rate=200.0,
            budget=500.0,
            latency=STS_LATENCY,
        )
    assert (run["credentials"], run["failures"], run["failure_kinds"]) == (TASKS, 0, {})
    assert (run["sts_calls"], run["distinct_sessions_at_sts"]) == (TASKS, TASKS)
    assert min(seconds for _, seconds, _ in run["_answers"]) >= STS_LATENCY
