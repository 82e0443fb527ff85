"""A tenant flooding the broker is throttled without the other tenants noticing; leaked and slow
connections are capped and cut at the broker as at the sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.listeners import ADMIN_LIMITS, CONTROL_LIMITS
from metaproxy.broker.server import BrokerServer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.net.connguard import COURTESY_MAX, FD_RESERVE
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
    await server.aclose()


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


@pytest.mark.slow  # started first: see tests/conftest.py
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
    # One full record per identity and window, the rest counted in its summary (issue 20).
    await broker.refusals.flush(everything=True)
    throttled = [r for r in audit_records(tmp_path / "audit") if r["event"] == "throttled"]
    assert len([r for r in throttled if "count" not in r]) <= len(set(flood_tokens))
    assert sum(r.get("count", 1) for r in throttled) == flooded.count(429)
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
    assert tight_broker.listeners.guard.rejected["per_client"] == 1
    assert tight_broker.listeners.guard.peak == 2
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
    assert tight_broker.listeners.guard.header_timeouts == 1
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


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def silent(host: str, port: int, source: str) -> Connection:
    """A TCP connection to the TLS port that never sends its ClientHello."""
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def test_silent_connections_are_counted_cut_at_the_deadline_and_do_not_lock_out(
    tight_broker: BrokerServer, pki: Pki, record_secrets: Callable[[BrokerServer], None]
) -> None:
    """Silent TCP connections (no ClientHello) count against the caps from the moment they are
    accepted: four addresses fill the 8 connections, a real client from a fifth address still
    gets its credentials, and every silent one is closed about one deadline after connecting."""
    host, port = host_port(tight_broker.url)
    started = time.monotonic()
    held = [await silent(host, port, f"127.0.4.{i // 2 + 1}") for i in range(8)]
    await asyncio.sleep(0.2)
    assert tight_broker.listeners.guard.open == 8
    assert tight_broker.listeners.guard.by_client() == {f"127.0.4.{i}": 2 for i in range(1, 5)}
    connector = aiohttp.TCPConnector(ssl=client_tls(pki), local_addr=("127.0.4.9", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        assert await post(session, tight_broker.url, issue(pki, "t-after-silent", "acme")) == 200
    record_secrets(tight_broker)
    assert tight_broker.listeners.guard.evicted == 1  # the oldest silent one of a heaviest address
    answers = await asyncio.wait_for(
        asyncio.gather(*(reader.read() for reader, _ in held), return_exceptions=True), 5
    )
    assert all(a == b"" or isinstance(a, ConnectionResetError) for a in answers), answers
    assert time.monotonic() - started < 1.0 + 1.5
    await asyncio.sleep(0.1)
    assert tight_broker.listeners.guard.open == 0
    for _, writer in held:
        writer.close()


CHILD_NOFILE = 512  # the broker's soft RLIMIT_NOFILE in the test below
CHILD_DEADLINE = 6.0


@pytest.fixture
def enough_file_descriptors() -> None:
    """The test process holds more silent sockets than the broker under test may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def child_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (CHILD_NOFILE, hard))


async def spawn_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """`python -m metaproxy broker` (uvloop) on TLS with a soft RLIMIT_NOFILE of CHILD_NOFILE."""
    ready = tmp_path / "broker-ready.json"
    argv = [
        "broker",
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--tls-cert", str(pki.broker_cert),
        "--tls-key", str(pki.broker_key),
        "--header-timeout", str(CHILD_DEADLINE),
        "--policies-dir", str(policies_dir),
        "--policy-reload-seconds", "3600",  # only SIGHUP reloads within this test
        "--trust", f"{ISSUER},{AUDIENCE},{pki.jwks}",
        "--document-key", str(pki.document_key),
        "--audit-dir", str(tmp_path / "child-audit"),
        "--audit-key", str(pki.audit_key),
        "--sts-endpoint", sts_url,
        "--instance", "nofile-broker",
        "--drain-seconds", "2",
        "--log-format", "json",
        "--ready-file", str(ready),
    ]  # fmt: skip
    with (tmp_path / "broker-child.log").open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "metaproxy", *argv,
            stdout=output, stderr=output, preexec_fn=child_nofile,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.returncode is None, (tmp_path / "broker-child.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "broker never became ready"
        await asyncio.sleep(0.05)
    return process, json.loads(ready.read_text())


async def open_connections(admin_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as answer:
        found = re.search(r"^metaproxy_broker_open_connections (\S+)$", await answer.text(), re.M)
    assert found is not None
    return float(found[1])


async def credentials_from(url: str, pki: Pki, token: str, source: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(ssl=client_tls(pki), local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            url + "/v1/credentials", json={}, headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        body: dict[str, Any] = await answer.json()
    return body


@pytest.mark.usefixtures("enough_file_descriptors")
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_silent_connections_cannot_use_up_the_descriptors_of_a_uvloop_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, issued_secrets: set[str]
) -> None:
    """`metaproxy broker` (uvloop) with RLIMIT_NOFILE 512 gets 700 silent TCP connections on its
    TLS port: it counts as many as its cap allows and closes the rest, stays within its
    descriptors, serves another client, reloads its policies on SIGHUP, and cuts every silent
    connection at the handshake deadline — nothing fails with EMFILE."""
    process, urls = await spawn_broker(tmp_path, pki, sts_url, policies_dir)
    reserved = ADMIN_LIMITS.max_connections + CONTROL_LIMITS.max_connections
    cap = CHILD_NOFILE - (FD_RESERVE + reserved)
    try:
        host, port = host_port(urls["url"])
        started = time.monotonic()
        held = [await silent(host, port, "127.0.0.1") for _ in range(700)]
        await asyncio.sleep(0.5)
        assert await open_connections(urls["admin_url"]) == cap
        # Counted ones, refused ones kept to say why inside TLS, and the rest of the process.
        fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        assert fds <= cap + COURTESY_MAX + FD_RESERVE // 2, fds

        body = await asyncio.wait_for(
            credentials_from(urls["url"], pki, issue(pki, "t-nofile", "acme"), "127.0.5.1"), 3
        )
        issued_secrets.update((body["credentials"]["secret_access_key"],))
        issued_secrets.update((body["credentials"]["session_token"],))

        globex = (policies_dir / "globex.toml").read_text()
        (policies_dir / "initech.toml").write_text(globex.replace("globex", "initech"))
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        token = issue(pki, "t-nofile-initech", "initech")
        body = await asyncio.wait_for(credentials_from(urls["url"], pki, token, "127.0.5.2"), 3)
        assert body["role_arn"] == "arn:aws:iam::222222222222:role/initech-app"
        issued_secrets.update((body["credentials"]["secret_access_key"],))
        issued_secrets.update((body["credentials"]["session_token"],))
        assert time.monotonic() - started < CHILD_DEADLINE - 1  # all of it while they are held

        answers = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in held), return_exceptions=True),
            CHILD_DEADLINE + 5,
        )
        assert all(a == b"" or isinstance(a, ConnectionResetError) for a in answers)
        assert time.monotonic() - started < CHILD_DEADLINE + 2.5
        await asyncio.sleep(0.2)
        assert await open_connections(urls["admin_url"]) == 0
        for _, writer in held:
            writer.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = (tmp_path / "broker-child.log").read_text()
    assert "Too many open files" not in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
