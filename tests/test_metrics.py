"""/metrics of a running broker and sidecar move with traffic: counters, histograms, gauges."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.testing.faultproxy import FaultProxy
from tests.conftest import SidecarFactory
from tests.support import Pki, broker_config, container_request, issue, scrape, value


async def ask(https: aiohttp.ClientSession, broker: BrokerServer, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        await answer.read()
        return answer.status


@pytest.fixture
async def slow_sts_broker(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    record_secrets: Callable[[BrokerServer], None],
) -> AsyncIterator[BrokerServer]:
    """A broker with one STS worker behind a proxy adding 0.4 s per STS call, so work queues."""
    async with FaultProxy(sts_url) as proxy:
        proxy.set(latency=0.4)
        config = broker_config(tmp_path, pki, proxy.url, policies_dir, workers_min=1, workers_max=1)
        server = await BrokerServer.start(config)
        yield server
        record_secrets(server)
        await server.aclose()


async def test_broker_metrics_follow_traffic(
    slow_sts_broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Requests, latency, queue depth, workers, STS calls, cache hits and rejections all move."""
    broker = slow_sts_broker
    before = await scrape(broker.admin_url)
    tokens = [issue(pki, f"m-task-{n}", "acme") for n in range(4)]
    cold = asyncio.gather(*(ask(https, broker, token) for token in tokens))
    # The first call holds the only worker for 0.4 s; meanwhile the others wait in the queue.
    deepest, workers = 0.0, 0.0
    while not cold.done():
        during = await scrape(broker.admin_url)
        deepest = max(deepest, value(during, "metaproxy_broker_queue_depth", priority="cold"))
        workers = max(workers, value(during, "metaproxy_broker_workers"))
        await asyncio.sleep(0.05)
    assert await cold == [200] * 4
    assert await ask(https, broker, tokens[0]) == 200  # warm: from the broker's cache
    assert await ask(https, broker, "not-a-token") == 401
    after = await scrape(broker.admin_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert deepest >= 1
    assert workers == 1
    assert value(after, "metaproxy_broker_queue_depth", priority="cold") == 0
    assert grew("metaproxy_broker_requests_total", tenant="acme", status="200") == 5
    assert grew("metaproxy_broker_requests_total", tenant="unknown", status="401") == 1
    assert grew("metaproxy_broker_request_seconds_count", outcome="uncached") == 4
    assert grew("metaproxy_broker_request_seconds_count", outcome="cached") == 1
    assert grew("metaproxy_broker_request_seconds_count", outcome="error") == 1
    assert grew("metaproxy_broker_sts_calls_total", result="ok") == 4
    assert grew("metaproxy_broker_sts_seconds_count") == 4
    assert grew("metaproxy_broker_sts_seconds_sum") >= 4 * 0.4
    assert grew("metaproxy_broker_cache_hits_total") == 1
    assert grew("metaproxy_broker_credentials_issued_total", tenant="acme") == 5
    assert (
        grew("metaproxy_broker_rejections_total", tenant="unknown", reason="unauthenticated") == 1
    )
    assert grew("metaproxy_broker_audit_write_seconds_count") >= 6  # 5 issued + 1 denied
    assert value(after, "metaproxy_broker_circuit_open") == 0


async def test_broker_counts_coalesced_requests(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """Concurrent identical cold requests make one STS call; the others count as coalesced."""
    before = await scrape(broker.admin_url)
    token = issue(pki, "m-coalesce", "acme")
    assert await asyncio.gather(*(ask(https, broker, token) for _ in range(5))) == [200] * 5
    after = await scrape(broker.admin_url)
    coalesced = value(after, "metaproxy_broker_coalesced_total") - value(
        before, "metaproxy_broker_coalesced_total"
    )
    sts_ok = value(after, "metaproxy_broker_sts_calls_total", result="ok") - value(
        before, "metaproxy_broker_sts_calls_total", result="ok"
    )
    assert (sts_ok, coalesced) == (1, 4)


async def test_sidecar_metrics_follow_traffic(start_sidecar: SidecarFactory) -> None:
    """Requests by path class, status and listener, latency, rejections (503, which every SDK
    retries) and the credential gauges move."""
    sidecar = await start_sidecar("acme", "m-sidecar")
    before = await scrape(sidecar.admin_url)
    headers = {"Authorization": sidecar.state.authorization_token}
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        async with session.put(
            sidecar.imds_url + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        ) as answer:
            assert answer.status == 200
        for _ in range(80):  # the tenant allows 50/s with a burst of 50: the rest is refused
            async with session.get(sidecar.container_url + "/v1/credentials", headers=headers) as a:
                statuses.append(a.status)
    after = await scrape(sidecar.admin_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    served, refused = statuses.count(200), statuses.count(503)
    assert served >= 50 and refused >= 1 and served + refused == 80
    imds, container = sidecar.state.config.imds_listen[0], sidecar.state.config.container_listen[0]

    def answered(path_class: str, status: str, listener: str) -> float:
        labels = {"path_class": path_class, "status": status, "listener": listener}
        return grew("metaproxy_sidecar_requests_total", **labels)

    assert answered("container", "200", container) == served
    assert answered("throttled", "503", container) == refused  # apart from the SLO's answers
    assert answered("token", "200", imds) == 1
    assert grew("metaproxy_sidecar_request_seconds_count", path_class="container") == served
    assert grew("metaproxy_sidecar_rejected_total", reason="rate_limited") == refused
    assert value(after, "metaproxy_sidecar_ready") == 1
    assert value(after, "metaproxy_sidecar_credentials_remaining_seconds") > 900
    assert value(after, "metaproxy_sidecar_refreshes_total", result="ok") >= 1
    assert value(after, "metaproxy_sidecar_broker_request_seconds_count") >= 1
    assert value(after, "metaproxy_sidecar_startup_seconds_count") >= 1
    assert value(after, "metaproxy_sidecar_open_fds") > 0
    # The admin listener counts its own requests (this scrape's predecessor included).
    assert answered("admin", "200", "admin") >= 1


async def test_pipelined_copies_are_each_rate_limited_and_counted(
    start_sidecar: SidecarFactory,
) -> None:
    """Copies of one request pipelined four at a time on one connection, the sidecar's fast
    path, are each taken from the pod's bucket (50/s, burst 50) and each counted and timed."""
    sidecar = await start_sidecar("acme", "m-pipelined")
    before = await scrape(sidecar.admin_url)
    host, port, request = container_request(sidecar)
    reader, writer = await asyncio.open_connection(host, port)
    statuses: list[bytes] = []
    for copies in [1] + [4] * 25:
        writer.write(request * copies)
        data = b""
        while data.count(b"HTTP/1.1 ") < copies or not data.endswith((b"}", b"\r\n\r\n")):
            data += await asyncio.wait_for(reader.read(65536), 5)
        statuses += [answer[:3] for answer in data.split(b"HTTP/1.1 ")[1:]]
    writer.close()
    after = await scrape(sidecar.admin_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    served, refused = statuses.count(b"200"), statuses.count(b"503")
    assert served + refused == 101
    assert served >= 50 and refused >= 1
    listener = sidecar.state.config.container_listen[0]
    labels = {"path_class": "container", "listener": listener}
    assert grew("metaproxy_sidecar_requests_total", status="200", **labels) == served
    assert grew("metaproxy_sidecar_request_seconds_count", path_class="container") == served
    throttled = {"path_class": "throttled", "listener": listener}
    assert grew("metaproxy_sidecar_requests_total", status="503", **throttled) == refused
    assert grew("metaproxy_sidecar_rejected_total", reason="rate_limited") == refused


async def test_broker_counts_sts_throttling(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
) -> None:
    """Every throttled STS attempt is counted, and the refused request shows as a 503."""
    async with FaultProxy(sts_url) as proxy:
        proxy.set(throttle_fraction=1.0)
        config = broker_config(tmp_path, pki, proxy.url, policies_dir, sts_max_attempts=2)
        broker = await BrokerServer.start(config)
        try:
            before = await scrape(broker.admin_url)
            assert await ask(https, broker, issue(pki, "m-throttled", "acme")) == 503
            after = await scrape(broker.admin_url)
        finally:
            await broker.aclose()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("metaproxy_broker_sts_calls_total", result="throttled") == 2
    assert grew("metaproxy_broker_sts_calls_total", result="ok") == 0
    assert grew("metaproxy_broker_requests_total", tenant="acme", status="503") == 1
    assert grew("metaproxy_broker_request_seconds_count", outcome="error") == 1


async def test_two_brokers_in_one_process_each_show_only_their_own_figures(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """Credentials issued by one broker show in its /metrics only; the other's stay at zero,
    and each one's STS counter is its own scheduler's total."""
    brokers = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        config = broker_config(tmp_path / name, pki, sts_url, policies_dir, instance=name)
        brokers.append(await BrokerServer.start(config))
    one, two = brokers
    try:
        tokens = [issue(pki, f"m-own-{n}", "acme") for n in range(3)]
        assert [await ask(https, one, token) for token in tokens] == [200] * 3
        assert await ask(https, two, "not-a-token") == 401
        seen_by_one, seen_by_two = await scrape(one.admin_url), await scrape(two.admin_url)
    finally:
        for broker in brokers:
            record_secrets(broker)
            await broker.aclose()

    issued, sts_ok = "metaproxy_broker_credentials_issued_total", "metaproxy_broker_sts_calls_total"
    assert value(seen_by_one, issued, tenant="acme") == 3
    assert value(seen_by_two, issued, tenant="acme") == 0
    assert value(seen_by_one, sts_ok, result="ok") == one.scheduler.stats().sts.ok == 3
    assert value(seen_by_two, sts_ok, result="ok") == two.scheduler.stats().sts.ok == 0
    unauthenticated = {"tenant": "unknown", "status": "401"}
    assert value(seen_by_one, "metaproxy_broker_requests_total", **unauthenticated) == 0
    assert value(seen_by_two, "metaproxy_broker_requests_total", **unauthenticated) == 1
