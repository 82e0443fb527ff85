"""The broker's STS client against moto's server, through the fault proxy, and against a
server on loopback that answers what real proxies and STS sometimes do. Every failure comes
back as one of our error classes, never as STS's or the proxy's text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from metaproxy.broker.credentials.sts import AsyncSts, StsThrottled
from metaproxy.errors import StsUnavailable, UpstreamError
from metaproxy.models import AssumeRoleSpec
from metaproxy.testing.faultproxy import FaultProxy

ROLE = "arn:aws:iam::111111111111:role/app"


def spec(session: str = "tenant.task-1") -> AssumeRoleSpec:
    return AssumeRoleSpec(ROLE, session, "", 900, tags=(("tenant", "acme"),))


@pytest.fixture
async def proxy(sts_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(sts_url) as running:
        yield running


async def test_assume_role_returns_credentials_that_expire_when_sts_says(proxy: FaultProxy) -> None:
    sts = AsyncSts(endpoint=proxy.url, max_connections=4)
    calls_seen_at_sending: list[int] = []
    try:
        role = await sts.assume_role(
            spec(), on_sent=lambda: calls_seen_at_sending.append(len(proxy.assume_role_timeline()))
        )
    finally:
        await sts.aclose()
    # The budget's call window counts a call when its bytes leave: before STS has it.
    assert calls_seen_at_sending == [0]
    assert role.assumed_role_arn == "arn:aws:sts::111111111111:assumed-role/app/tenant.task-1"
    assert role.credentials.access_key_id.startswith("ASIA")
    assert role.credentials.secret_access_key and role.credentials.session_token
    expires_in = role.credentials.expiration - datetime.now(UTC)
    assert timedelta(minutes=14) < expires_in <= timedelta(minutes=15, seconds=5)
    assert proxy.stats()["assume_role_calls"] == 1


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        ({"throttle_fraction": 1.0}, StsThrottled),
        ({"error_fraction": 1.0}, StsUnavailable),
        ({"mode": "refuse"}, StsUnavailable),
        ({"mode": "reset"}, StsUnavailable),
    ],
)
async def test_sts_faults_become_our_retryable_errors(
    proxy: FaultProxy, faults: dict[str, object], expected: type[Exception]
) -> None:
    proxy.set(**faults)
    sts = AsyncSts(endpoint=proxy.url, timeout=2.0)
    try:
        with pytest.raises(expected) as caught:
            await sts.assume_role(spec())
    finally:
        await sts.aclose()
    assert "Rate exceeded" not in str(caught.value)  # STS's own message stays here


async def test_a_blackholed_call_times_out(proxy: FaultProxy) -> None:
    proxy.set(mode="blackhole")
    sts = AsyncSts(endpoint=proxy.url, timeout=0.5)
    try:
        with pytest.raises(StsUnavailable, match="TimeoutError"):
            await sts.assume_role(spec())
    finally:
        await sts.aclose()


async def test_parameters_sts_would_refuse_are_refused_here_without_a_call(
    proxy: FaultProxy,
) -> None:
    sts = AsyncSts(endpoint=proxy.url)
    try:
        with pytest.raises(UpstreamError, match="invalid parameters"):
            await sts.assume_role(spec(session="x"))  # RoleSessionName needs 2..64 characters
    finally:
        await sts.aclose()
    assert proxy.stats()["assume_role_calls"] == 0


ACCESS_DENIED = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
    "<Code>AccessDenied</Code><Message>User is not authorized to perform sts:AssumeRole</Message>"
    "</Error><RequestId>r-1</RequestId></ErrorResponse>"
)
SUCCESS_MISSING_SECRET = (
    '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>'
    "<Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SessionToken>t</SessionToken>"
    "<Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult>"
    "</AssumeRoleResponse>"
)


@pytest.mark.parametrize(
    ("status", "body", "expected", "message"),
    [
        (403, ACCESS_DENIED, UpstreamError, "AccessDenied"),
        (502, "<html><body>Bad Gateway</body></html>", StsUnavailable, "HTTP 502"),
        (200, "<html>captive portal", StsUnavailable, "unreadable"),
        (200, SUCCESS_MISSING_SECRET, StsUnavailable, "incomplete"),
        (404, "not xml at all", UpstreamError, "HTTP 404"),
    ],
)
async def test_odd_answers_become_our_errors(
    aiohttp_server: AiohttpServer,
    status: int,
    body: str,
    expected: type[Exception],
    message: str,
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/", answer)
    server = await aiohttp_server(app)
    sts = AsyncSts(endpoint=str(server.make_url("/")))
    try:
        with pytest.raises(expected, match=message) as caught:
            await sts.assume_role(spec())
    finally:
        await sts.aclose()
    assert "not authorized" not in str(caught.value)
