"""What a flood of refusals costs the audit log: a looping caller with a valid token, and
unauthenticated callers rotating source addresses, against a real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from metaproxy.broker.authn import (
    BURST,
    GLOBAL_BURST,
    GLOBAL_PER_SECOND,
    OVER_GLOBAL_LIMIT,
    OVER_LIMIT,
    peer_network,
)
from metaproxy.broker.server import BrokerServer
from tests.support import (
    CONTROL_TOKEN,
    Pki,
    audit_records,
    broker_config,
    issue,
    scrape,
    value,
)

SUMMARISED = "metaproxy_broker_audit_summarised_total"


def records_of(broker: BrokerServer, **match: object) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(broker.config.audit_dir)
        if all(r.get(k) == v for k, v in match.items())
    ]


def answered(records: list[dict[str, Any]]) -> int:
    """How many answers the records stand for: one each, or a summary's count."""
    return sum(int(r.get("count", 1)) for r in records)


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str, role: str | None = None
) -> int:
    body = {"role": role} if role else {}
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json=body, headers=headers) as answer:
        return answer.status


async def set_broker_limits(broker: BrokerServer, policies_dir: Path, limits: str) -> None:
    """Replace acme's [limits.broker] and wait until the broker has reloaded the policy."""
    policy = policies_dir / "acme.toml"
    generation = broker.policies.generation
    policy.write_text(policy.read_text().replace("requests_per_second = 50\nburst = 100", limits))
    async with asyncio.timeout(10):
        while broker.policies.generation == generation:
            await asyncio.sleep(0.05)


async def test_a_looping_caller_refused_by_policy_then_revocation_costs_a_record_per_cause(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, policies_dir: Path
) -> None:
    """160 refusals of one task in a loop (80 for a role its app may not have, 80 once revoked):
    one full record per cause and one summary each, whose counts add up to 160."""
    unlimited = "requests_per_second = 1000\nburst = 1000\nper_identity_rps = 1000\n"
    await set_broker_limits(broker, policies_dir, unlimited + "per_identity_burst = 1000")
    token = issue(pki, "looper", "acme")
    statuses = [await ask(https, broker, token, "acme-reports") for _ in range(80)]
    control = broker.control_url + "/v1/revocations"
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    async with https.post(
        control, json={"tenant": "acme", "task": "looper"}, headers=headers
    ) as answer:
        assert answer.status == 200
    statuses += [await ask(https, broker, token) for _ in range(80)]
    assert statuses == [403] * 160

    def denied() -> list[dict[str, Any]]:
        return records_of(broker, task="looper", event="denied")

    assert {r["rule"]: r.get("count") for r in denied()} == {
        "app-not-allowed": None,
        "acme.toml roles[0]": None,  # allowed by policy, refused as revoked
    }
    assert await broker.refusals.flush(everything=True) == 2
    records = denied()
    assert len(records) == 4
    assert answered(records) == 160
    summaries = [r for r in records if "count" in r]
    assert [r["count"] for r in summaries] == [79, 79]
    assert all(r["reason"].endswith("(repeated)") for r in summaries)
    assert {(r["tenant"], r["subject"]) for r in records} == {("acme", "task:acme/looper")}
    assert value(await scrape(broker.admin_url), SUMMARISED, kind="refusal") == 158


async def test_a_caller_over_its_tenants_rate_costs_one_throttled_record_and_a_summary(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki, policies_dir: Path
) -> None:
    """A tenant allowed 1 request/s (burst 2) asked 40 times at once: every 429 is accounted
    for by one full record and one summary."""
    await set_broker_limits(broker, policies_dir, "requests_per_second = 1\nburst = 2")
    token = issue(pki, "throttled", "acme")
    statuses = await asyncio.gather(*(ask(https, broker, token) for _ in range(40)))
    throttled = statuses.count(429)
    assert throttled >= 35
    await broker.refusals.flush(everything=True)
    records = records_of(broker, task="throttled", event="throttled")
    assert [r.get("count") for r in records] == [None, throttled - 1]
    assert answered(records) == throttled


# Unauthenticated floods: a plain-HTTP broker, so each of hundreds of source addresses costs a
# TCP connection and no TLS handshake (the budget is what is measured, not the handshakes).


@pytest.fixture
async def plain_broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    config = broker_config(tmp_path, pki, sts_url, policies_dir, tls_cert=None, tls_key=None)
    server = await BrokerServer.start(config)
    yield server
    await server.aclose()


async def post_from(source: str, url: str, token: str) -> int:
    """One request with a bad token from `source` (a loopback address: all of 127/8 is)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, local_addr=(source, 0)
    )
    try:
        writer.write(
            b"POST /v1/credentials HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def flood(url: str, sources: list[str], token: str) -> list[int]:
    turns = asyncio.Semaphore(32)

    async def one(source: str) -> int:
        async with turns:
            return await post_from(source, url, token)

    return await asyncio.gather(*(one(source) for source in sources))


def authentication_records(broker: BrokerServer) -> list[dict[str, Any]]:
    return records_of(broker, rule="authentication")


async def test_rotating_addresses_within_one_slash_24_share_one_failure_budget(
    plain_broker: BrokerServer,
) -> None:
    """200 addresses of 127.0.9.0/24, one bad token each: records up to the network's burst,
    429 for the rest, counted in one summary for the network."""
    sources = [f"127.0.9.{n}" for n in range(1, 201)]
    statuses = await flood(plain_broker.url, sources, "garbage.token.here")
    assert set(statuses) == {401, 429}
    assert statuses.count(401) <= BURST + 2  # the burst, and what refilled meanwhile
    await plain_broker.failures.flush(everything=True)
    records = authentication_records(plain_broker)
    full = [r for r in records if "count" not in r]
    (summary,) = [r for r in records if "count" in r]
    assert len(full) == statuses.count(401)
    assert (summary["peer"], summary["status"], summary["reason"]) == (
        "127.0.9.0/24",
        429,
        f"{OVER_LIMIT} (repeated)",
    )
    assert summary["count"] == statuses.count(429)
    assert answered(records) == len(sources)
    samples = await scrape(plain_broker.admin_url)
    assert value(samples, SUMMARISED, kind="authentication") == statuses.count(429)


async def test_the_global_budget_bounds_a_flood_from_many_networks(
    plain_broker: BrokerServer,
) -> None:
    """One bad token from each of 400 /24 networks: no network is over its own budget, but the
    records stop at the broker's global budget and the rest is one summary."""
    sources = [f"127.{10 + n // 200}.{n % 200}.1" for n in range(400)]
    started = time.monotonic()
    statuses = await flood(plain_broker.url, sources, "garbage.token.here")
    elapsed = time.monotonic() - started
    recorded = statuses.count(401)
    assert recorded <= GLOBAL_BURST + GLOBAL_PER_SECOND * elapsed + 1
    assert statuses.count(429) == len(sources) - recorded > 0
    await plain_broker.failures.flush(everything=True)
    records = authentication_records(plain_broker)
    assert len([r for r in records if "count" not in r]) == recorded
    (summary,) = [r for r in records if "count" in r]
    assert (summary["peer"], summary["reason"]) == ("*", f"{OVER_GLOBAL_LIMIT} (repeated)")
    assert summary["count"] == statuses.count(429)


@pytest.mark.parametrize(
    ("peer", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("::ffff:192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unix", "unix"),
    ],
)
def test_a_failure_budget_belongs_to_the_peers_network(peer: str, network: str) -> None:
    """IPv4 peers share a budget per /24, IPv6 per /64; a Unix socket's peers share one."""
    assert peer_network(peer) == network
