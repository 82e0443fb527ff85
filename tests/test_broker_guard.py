"""The broker's connection guard on real sockets: every request head on a connection has the
header deadline, and health probes are answered even when other admin clients hold every admin
connection."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.listeners import ADMIN_LIMITS
from metaproxy.broker.server import BrokerServer
from tests.support import Pki, broker_config, issue

CORPUS = Path(__file__).parent / "fuzz_corpus"
DEADLINE = 1.0
# The cases a client could use to hold a socket past the head deadline (fuzz corpus).
STALLS = [
    "85-leading-empty-lines-then-stall.http",
    "86-second-request-head-never-finishes.http",
    "90-only-empty-lines-then-stall.http",
    "91-second-head-after-empty-lines-stalls.http",
    "92-second-head-after-a-body-stalls.http",
    "93-second-head-after-a-chunked-body-stalls.http",
]


@pytest.fixture
async def tight_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    """8 connections (2 per address), a 1 s header deadline, 60 s keep-alive as in production."""
    config = broker_config(
        tmp_path, pki, sts_url, policies_dir, max_connections=8, header_timeout=DEADLINE
    )
    server = await BrokerServer.start(config)
    yield server
    await server.aclose()


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.partition("://")[2].rpartition(":")
    return host, int(port)


async def closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    received = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize("case", STALLS)
async def test_every_request_head_has_the_deadline(
    tight_broker: BrokerServer, pki: Pki, case: str
) -> None:
    """Leading empty lines, and the second head on a kept-alive connection (after a bodyless,
    a sized or a chunked request), are cut at the header deadline, not the 60 s keep-alive."""
    host, port = host_port(tight_broker.url)
    context = ssl.create_default_context(cafile=str(pki.ca))
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    writer.write((CORPUS / case).read_bytes())
    answer, elapsed = await closed_after(reader, DEADLINE + 5)
    writer.close()
    assert elapsed < DEADLINE + 1.5, answer
    assert answer.endswith(
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    ), answer


async def test_a_kept_alive_connection_between_requests_is_not_cut(
    tight_broker: BrokerServer, pki: Pki
) -> None:
    """The deadline is for heads being sent: an idle kept-alive connection stays open past it
    and serves its next request."""
    host, port = host_port(tight_broker.url)
    context = ssl.create_default_context(cafile=str(pki.ca))
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    request = b"GET /nothing-here HTTP/1.1\r\nHost: broker\r\n\r\n"
    for _ in range(2):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 404 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(DEADLINE + 0.5)
    writer.close()


async def hold_admin(host: str, port: int, source: str) -> asyncio.StreamWriter:
    """An admin connection kept alive after one answered request (a scraper's, say)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"ok"), 5)
    return writer


async def get(host: str, port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
    answer, _ = await closed_after(reader, 5)
    writer.close()
    return answer


async def test_health_probes_are_answered_when_other_clients_hold_every_admin_slot(
    tight_broker: BrokerServer,
) -> None:
    """Scrapers hold all 64 admin connections, half of them from the kubelet's own address (the
    node's, shared with host-network clients): /healthz and /readyz still get their answers
    (never 429, which would restart a healthy broker); anything else is refused."""
    host, port = host_port(tight_broker.admin_url)
    share = ADMIN_LIMITS.max_per_client
    sources = ["127.0.0.1"] * share + [f"127.0.3.{i + 1}" for i in range(share)]
    holders = [await hold_admin(host, port, source) for source in sources]
    assert tight_broker.listeners.admin_guard.open == ADMIN_LIMITS.max_connections
    healthz, readyz, metrics = [
        await get(host, port, p) for p in ("/healthz", "/readyz", "/metrics")
    ]
    assert healthz.startswith(b"HTTP/1.1 200 ") and healthz.endswith(b"ok")
    assert readyz.startswith(b"HTTP/1.1 200 ") and readyz.endswith(b"ready")
    assert metrics.startswith(b"HTTP/1.1 429 ")
    assert tight_broker.listeners.admin_guard.probes_answered == 2
    tight_broker.probe.draining = True
    assert (await get(host, port, "/readyz")).startswith(b"HTTP/1.1 503 ")
    for writer in holders:
        writer.close()


async def test_a_unix_socket_broker_counts_connections_from_accept_and_serves(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """On a Unix socket (no TLS, every peer one address) a silent connection counts from accept
    and is cut at the header deadline, and a client is served beside it."""
    with tempfile.TemporaryDirectory(prefix="mp-") as short:  # sun_path holds 108 bytes
        path = f"{short}/broker.sock"
        config = broker_config(
            tmp_path, pki, sts_url, policies_dir, socket=Path(path), header_timeout=DEADLINE
        )
        server = await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            await asyncio.sleep(0.1)
            assert server.listeners.guard.by_client() == {"": 1}
            token = issue(pki, "t-unix", "acme")
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
                session.post(
                    "http://broker/v1/credentials",
                    json={},
                    headers={"Authorization": f"Bearer {token}"},
                ) as answer,
            ):
                assert answer.status == 200
            answer_bytes, elapsed = await closed_after(reader, DEADLINE + 5)
            assert answer_bytes.startswith(b"HTTP/1.1 408 ")
            assert elapsed < DEADLINE + 1.5
            writer.close()
        finally:
            record_secrets(server)
            await server.aclose()
