"""Outages: STS unreachable for longer than a refresh period, and the broker killed and
restarted. Tasks keep valid credentials throughout; afterwards refreshes resume within budget.

Refresh periods are shortened to seconds rather than hours: 1800 s credentials (the policy floor),
the broker refreshing at 0.25% of their life (~4.5 s) and sidecars asking about every second
(`min_serve_seconds` close to the lifetime), so no real hours pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from bench.common import write_tenant_policies
from metaproxy.broker.credentials.scheduler import FairScheduler
from metaproxy.broker.credentials.sts import AsyncSts
from metaproxy.broker.server import BrokerServer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.sidecar.process import Sidecar
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import Pki, broker_config, issue, sidecar_config, wait_ready

# Sidecars ask the broker about once a second: 1800 s credentials are always "within
# min_serve_seconds + 60 s" of their end, so the keeper's refresh delay is its 1 s floor.
FAST_SIDECAR = {"refresh_fraction": 0.1, "min_serve_seconds": 1780.0}
BROKER_REFRESH_FRACTION = 0.0025  # of 1800 s: the broker refreshes a key every ~4.5 s


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as fault_proxy:
        yield fault_proxy


async def start_sidecars(
    tmp_path: Path, pki: Pki, broker_url: str, tasks: list[tuple[str, str]]
) -> list[Sidecar]:
    sidecars = []
    for tenant, task in tasks:
        token_file = tmp_path / f"{tenant}-{task}.jwt"
        token_file.write_text(issue(pki, task, tenant))
        config = sidecar_config(tmp_path, pki, broker_url, token_file, **FAST_SIDECAR)
        sidecar = Sidecar(config)
        await sidecar.start()
        sidecars.append(sidecar)
    for sidecar in sidecars:
        await wait_ready(sidecar.admin_url, timeout=20)
    return sidecars


async def served_credentials(session: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    """What an SDK gets from the sidecar now; asserts it is a valid, unexpired set."""
    token = sidecar.state.authorization_token
    async with session.get(
        sidecar.container_url + "/v1/credentials", headers={"Authorization": token}
    ) as response:
        assert response.status == 200, await response.text()
        document = json.loads(await response.text())
    expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    assert expiration.replace(tzinfo=UTC) > datetime.now(UTC)
    return str(document["AccessKeyId"])


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_sts_outage_longer_than_a_refresh_keeps_tasks_served_then_recovers_in_budget(
    tmp_path: Path, pki: Pki, proxy: FaultProxy
) -> None:
    """STS refuses connections for ~3 broker refresh periods: every task keeps serving valid
    credentials, the circuit opens; when STS returns every key is refreshed, at no more than
    the budget."""
    budget = 4.0
    tasks = [(tenant, f"task-{i}") for tenant in ("t1", "t2") for i in range(5)]
    policies = write_tenant_policies(tmp_path / "policies", ["t1", "t2"], duration_seconds=1800)
    config = broker_config(
        tmp_path, pki, proxy.url, policies, cache_refresh_fraction=BROKER_REFRESH_FRACTION
    )
    sts = AsyncSts(endpoint=proxy.url, timeout=1.0)
    scheduler = FairScheduler(
        sts,
        budget_per_second=budget,
        failure_threshold=3,
        cool_down=1.0,
        call_timeout=2.0,
    )
    broker = await BrokerServer.start(config, sts=sts, scheduler=scheduler)  # closes sts
    sidecars: list[Sidecar] = []
    try:
        sidecars = await start_sidecars(tmp_path, pki, broker.url, tasks)
        async with aiohttp.ClientSession() as session:
            proxy.set(mode="refuse")
            held = {}
            for _ in range(20):  # ~10 s of outage: two broker refresh periods and more
                for sidecar in sidecars:
                    held[sidecar.admin_url] = await served_credentials(session, sidecar)
                await asyncio.sleep(0.5)
            assert scheduler.stats().sts.circuit_opened >= 1
            assert scheduler.stats().sts.fast_failures > 0

            proxy.set(mode="pass")
            proxy.reset_counters()
            for _ in range(60):
                fresh = [
                    await served_credentials(session, sidecar) != held[sidecar.admin_url]
                    for sidecar in sidecars
                ]
                if all(fresh):
                    break
                await asyncio.sleep(0.5)
            assert all(fresh), "some tasks never got refreshed credentials after STS returned"
    finally:
        for sidecar in sidecars:
            await sidecar.aclose()
        await broker.aclose()
        await scheduler.aclose()
    assert int(str(proxy.stats()["assume_role_forwarded"])) >= len(tasks)
    assert proxy.max_rate(1.0) <= budget
    assert not scheduler.stats().sts.circuit_open


async def start_broker_process(
    tmp_path: Path, pki: Pki, port: int, sts_endpoint: str, policies: Path
) -> tuple[asyncio.subprocess.Process, int]:
    """`metaproxy broker` on `port` (0: one the kernel picks); the process and its port."""
    ready = tmp_path / "broker.ready.json"
    ready.unlink(missing_ok=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "metaproxy", "broker",
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", "127.0.0.1:0",
        "--tls-cert", str(pki.broker_cert),
        "--tls-key", str(pki.broker_key),
        "--policies-dir", str(policies),
        "--trust", f"{ISSUER},{AUDIENCE},{pki.jwks}",
        "--audit-dir", str(tmp_path / "audit"),
        "--audit-key", str(pki.audit_key),
        "--sts-endpoint", sts_endpoint,
        "--sts-budget-per-second", "20",
        "--cache-refresh-fraction", str(BROKER_REFRESH_FRACTION),
        "--instance", "killable-broker",
        "--log-format", "text",
        "--ready-file", str(ready),
        env=dict(os.environ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(tmp_path / "broker.log").open("ab"),
    )  # fmt: skip
    for _ in range(400):
        if ready.exists() and ready.read_text().strip():
            return process, urlsplit(json.loads(ready.read_text())["url"]).port or 0
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    process.kill()
    await process.wait()
    raise AssertionError("broker process did not become ready")


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_broker_killed_and_restarted_sidecars_keep_serving_and_refresh_from_the_new_one(
    tmp_path: Path, pki: Pki, proxy: FaultProxy
) -> None:
    """SIGKILL the broker process: the sidecar keeps serving its cached, valid credentials;
    a new broker on the same port is used for the next refresh."""
    policies = write_tenant_policies(tmp_path / "policies", ["t1"], duration_seconds=1800)
    broker, port = await start_broker_process(tmp_path, pki, 0, proxy.url, policies)
    sidecars: list[Sidecar] = []
    try:
        sidecars = await start_sidecars(
            tmp_path, pki, f"https://127.0.0.1:{port}", [("t1", "task-1"), ("t1", "task-2")]
        )
        async with aiohttp.ClientSession() as session:
            before = {s.admin_url: await served_credentials(session, s) for s in sidecars}
            broker.send_signal(signal.SIGKILL)
            await broker.wait()
            for _ in range(6):  # 3 s with no broker at all
                for sidecar in sidecars:
                    assert await served_credentials(session, sidecar) == before[sidecar.admin_url]
                await asyncio.sleep(0.5)
            assert all(s.state.keeper.last_error for s in sidecars)  # they did notice

            calls_before_restart = proxy.stats()["assume_role_calls"]
            broker, _ = await start_broker_process(tmp_path, pki, port, proxy.url, policies)
            for _ in range(60):
                after = {s.admin_url: await served_credentials(session, s) for s in sidecars}
                if all(after[url] != before[url] for url in after):
                    break
                await asyncio.sleep(0.5)
            assert all(after[url] != before[url] for url in after)
            assert int(str(proxy.stats()["assume_role_calls"])) > int(str(calls_before_restart))
    finally:
        for sidecar in sidecars:
            await sidecar.aclose()
        if broker.returncode is None:
            broker.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(broker.wait(), 10)
        if broker.returncode is None:
            broker.kill()
            await broker.wait()


def test_retry_delay_lands_inside_the_second_the_broker_picked() -> None:
    """Retry-After has whole seconds and is rounded down by the broker: a sidecar adds up to a
    second of jitter. Without one, full-jitter backoff."""
    from metaproxy.sidecar.credentials_cache import retry_delay

    after = [retry_delay(3.0, backoff=8.0) for _ in range(500)]
    assert all(3.0 <= delay < 4.0 for delay in after)
    assert max(after) - min(after) > 0.5  # spread, not all at the same instant
    backoff = [retry_delay(None, backoff=2.0) for _ in range(500)]
    assert all(0.0 <= delay <= 2.0 for delay in backoff)
