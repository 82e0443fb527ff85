"""A tenant flooding the broker is throttled without the other tenants noticing; leaked and slow
connections are capped and cut at the broker as at the sidecar."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from tests.support import Pki, audit_records, broker_config, issue


def client_tls(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


@pytest.fixture
async def http(pki: Pki) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_tls(pki), limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, token: str) -> int:
    async with http.post(
        url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        await response.read()
        return response.status


@pytest.fixture
async def tight_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    """A broker with 8 connections (2 per client address) and a 1 s header deadline."""
    config = broker_config(
        tmp_path, pki, sts_url, policies_dir, max_connections=8, header_timeout=1.0
    )
    server = await BrokerServer.start(config)
    yield server
    await server.stop()


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


async def test_flooding_tenant_gets_429_while_another_is_served(
    broker: BrokerServer, http: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    """acme floods from 40 identities and is throttled (and audited); globex sees only 200s."""
    flood_tokens = [issue(pki, f"flood-{i}", "acme") for i in range(40)] * 10
    other_tokens = [issue(pki, f"calm-{i}", "globex") for i in range(20)]

    async def calm() -> list[int]:
        statuses = []
        for token in other_tokens:
            statuses.append(await post(http, broker.url, token))
            await asyncio.sleep(0.02)
        return statuses

    flood = asyncio.gather(*(post(http, broker.url, t) for t in flood_tokens))
    other, flooded = await asyncio.gather(calm(), flood)

    assert other == [200] * len(other_tokens)
    assert flooded.count(429) >= 200  # a burst of 100 and ~50/s, for 400 requests
    assert set(flooded) <= {200, 429}
    throttled = [r for r in audit_records(tmp_path / "audit") if r["event"] == "throttled"]
    assert len(throttled) == flooded.count(429)
    assert {r["tenant"] for r in throttled} == {"acme"}
    assert {r["status"] for r in throttled} == {429}


async def test_connections_past_the_per_client_share_get_429(
    tight_broker: BrokerServer, pki: Pki
) -> None:
    """With 8 connections, one address may hold 2; the third is answered 429 and closed."""
    host, port = host_port(tight_broker.url)
    context = client_tls(pki)
    held = [await asyncio.open_connection(host, port, ssl=context) for _ in range(2)]
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    answer = await asyncio.wait_for(reader.read(), 3)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 ")
    assert b"Retry-After: 1" in head
    assert json.loads(body)["code"] == "TooManyConnections"
    assert tight_broker.guard.rejected["per_client"] == 1
    assert tight_broker.guard.peak == 2
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_slow_headers_and_stalled_handshakes_are_cut(
    tight_broker: BrokerServer, pki: Pki
) -> None:
    """A TLS client trickling headers, and a TCP client that never starts TLS, are both closed
    about one header deadline after connecting."""
    host, port = host_port(tight_broker.url)
    reader, writer = await asyncio.open_connection(host, port, ssl=client_tls(pki))
    raw_reader, raw_writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n")
    answers = await asyncio.wait_for(asyncio.gather(reader.read(), raw_reader.read()), 5)
    elapsed = time.monotonic() - started
    assert answers[0].startswith(b"HTTP/1.1 408 ")
    assert answers[1] == b""
    assert elapsed < 1.0 + 1.5
    assert tight_broker.guard.header_timeouts == 1
    writer.close()
    raw_writer.close()


async def test_a_trickled_body_is_408_at_the_deadline(tight_broker: BrokerServer, pki: Pki) -> None:
    """Headers on time but the body stalls: 408 after the deadline, no handler left waiting."""
    host, port = host_port(tight_broker.url)
    reader, writer = await asyncio.open_connection(host, port, ssl=client_tls(pki))
    token = issue(pki, "t-slow-body", "acme")
    writer.write(
        b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n{{".encode()
    )
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 1.0 + 1.5
    writer.close()


async def test_a_connection_storm_waits_in_the_accept_queue_instead_of_being_dropped(
    broker: BrokerServer,
) -> None:
    """A deployment's sidecars connect at once. With the event loop busy for a moment, 600
    connections must all complete their handshake in the kernel's accept queue; a shallow queue
    drops the excess SYNs, and those clients come back only on TCP's retransmit timer (1 s, then
    2 s …), past this test's 0.8 s connect timeout."""
    host, port = host_port(broker.url)
    connected: list[socket.socket] = []
    failed = 0

    def storm() -> None:
        nonlocal failed
        for _ in range(600):
            try:
                connected.append(socket.create_connection((host, port), timeout=0.8))
            except OSError:
                failed += 1

    thread = threading.Thread(target=storm)
    thread.start()
    time.sleep(1.0)
    await asyncio.to_thread(thread.join)
    for sock in connected:
        sock.close()
    assert (len(connected), failed) == (600, 0)
