"""The STS emulator and the fault-injection proxy, driven by real boto3 and aiohttp clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from metaproxy.testing.clocks import ManualClock
from metaproxy.testing.emulator import StsEmulator
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.recording import max_calls_in_window

ROLE_ARN = "arn:aws:iam::123456789012:role/tenant-a/app"
ASSUMED_ROLE_ARN = "arn:aws:sts::123456789012:assumed-role/app/task-1"
# botocore's `max_attempts` key counts retries only (1 would mean two calls); `total_max_attempts`
# counts the first attempt too, so 1 means botocore never retries on its own.
NO_RETRIES = Config(
    retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10
)
ASSUME_ROLE_FORM = {
    "Action": "AssumeRole",
    "Version": "2011-06-15",
    "RoleArn": ROLE_ARN,
    "RoleSessionName": "task-1",
}
# moto routes unsigned requests to S3; a SigV4-shaped header sends them to STS.
STS_AUTH_HEADER = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/sts/aws4_request, "
    "SignedHeaders=host, Signature=0"
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[StsEmulator]:
    with StsEmulator() as running:
        yield running


@pytest.fixture
async def proxy(emulator: StsEmulator) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(emulator.url, seed=20240601) as running:
        yield running


def sts_client(endpoint: str, credentials: dict[str, Any] | None = None) -> Any:
    keys = credentials or {"AccessKeyId": "testing", "SecretAccessKey": "testing"}
    session = boto3.session.Session(
        aws_access_key_id=keys["AccessKeyId"],
        aws_secret_access_key=keys["SecretAccessKey"],
        aws_session_token=keys.get("SessionToken"),
        region_name="us-east-1",
    )
    return session.client("sts", endpoint_url=endpoint, config=NO_RETRIES)


def assume_role(endpoint: str) -> dict[str, Any]:
    response: dict[str, Any] = sts_client(endpoint).assume_role(
        RoleArn=ROLE_ARN, RoleSessionName="task-1"
    )
    return response


def assume_role_error(endpoint: str) -> ClientError:
    with pytest.raises(ClientError) as caught:
        assume_role(endpoint)
    return caught.value


async def post_assume_role(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/", data=ASSUME_ROLE_FORM, headers=STS_AUTH_HEADER) as response:
        await response.read()
        return response.status


# -- the emulator --------------------------------------------------------------------------


def test_emulator_answers_assume_role_for_any_role(emulator: StsEmulator) -> None:
    """moto issues credentials for an arbitrary role ARN and knows them in GetCallerIdentity."""
    credentials = assume_role(emulator.url)["Credentials"]
    identity = sts_client(emulator.url, credentials).get_caller_identity()
    assert credentials["AccessKeyId"].startswith("ASIA")
    assert identity["Arn"] == ASSUMED_ROLE_ARN


def test_emulator_stop_ends_the_child_process() -> None:
    """stop() terminates and reaps moto; the URL no longer answers."""
    emulator = StsEmulator()
    url = emulator.start()
    pid = emulator.pid
    emulator.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    assert not emulator.running


# -- forwarding ----------------------------------------------------------------------------


async def test_assume_role_through_proxy_gives_working_credentials(proxy: FaultProxy) -> None:
    """boto3 assumes a role through the proxy and the credentials identify as that role."""
    credentials = (await asyncio.to_thread(assume_role, proxy.url))["Credentials"]
    await asyncio.to_thread(assume_role, proxy.url)
    identity = await asyncio.to_thread(
        lambda: sts_client(proxy.url, credentials).get_caller_identity()
    )
    stats = proxy.stats()
    assert identity["Arn"] == ASSUMED_ROLE_ARN
    assert (stats["assume_role_calls"], stats["assume_role_forwarded"]) == (2, 2)
    assert stats["requests_total"] == 3


async def test_proxy_streams_large_s3_objects_both_ways(proxy: FaultProxy) -> None:
    """Non-STS traffic (S3 put and get of 2 MiB) passes through byte for byte."""
    payload = os.urandom(2 * 1024 * 1024)

    def round_trip() -> bytes:
        s3 = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=proxy.url, config=NO_RETRIES)
        s3.create_bucket(Bucket="audit-segments")
        s3.put_object(Bucket="audit-segments", Key="seg/0001", Body=payload)
        body: bytes = s3.get_object(Bucket="audit-segments", Key="seg/0001")["Body"].read()
        return body

    assert await asyncio.to_thread(round_trip) == payload
    assert proxy.stats()["assume_role_calls"] == 0


async def test_proxy_never_forwards_admin_paths(proxy: FaultProxy) -> None:
    """/_fault paths on the proxy port answer 404 and are not counted or forwarded."""
    async with aiohttp.ClientSession() as http:
        for path in ("/_fault", "/_fault/stats", "//_fault/reset", "/%5Ffault/stats"):
            async with http.get(proxy.url + path) as response:
                assert response.status == 404, path
                assert await response.json() == {"error": "not found"}
    assert proxy.stats()["requests_total"] == 0


# -- throttling and errors -----------------------------------------------------------------


async def test_full_throttling_raises_sts_throttling_error(proxy: FaultProxy) -> None:
    """With throttle_fraction=1, botocore parses a ClientError with code Throttling."""
    proxy.set(throttle_fraction=1.0)
    error = await asyncio.to_thread(assume_role_error, proxy.url)
    assert error.response["Error"]["Code"] == "Throttling"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert (proxy.stats()["assume_role_throttled"], proxy.stats()["assume_role_forwarded"]) == (
        1,
        0,
    )


async def test_throttling_spares_other_sts_actions(proxy: FaultProxy) -> None:
    """GetCallerIdentity is forwarded even when every AssumeRole is throttled."""
    proxy.set(throttle_fraction=1.0, error_fraction=1.0)
    identity = await asyncio.to_thread(lambda: sts_client(proxy.url).get_caller_identity())
    assert identity["Account"] == "123456789012"


async def test_half_throttling_throttles_about_half(proxy: FaultProxy) -> None:
    """throttle_fraction=0.5 throttles roughly half of 200 AssumeRole calls."""
    proxy.set(throttle_fraction=0.5)
    async with aiohttp.ClientSession() as http:
        statuses = [await post_assume_role(http, proxy.url) for _ in range(200)]
    stats = proxy.stats()
    assert 60 <= statuses.count(400) <= 140
    assert statuses.count(400) + statuses.count(200) == 200
    assert stats["assume_role_throttled"] == statuses.count(400)
    assert stats["assume_role_forwarded"] == statuses.count(200)


async def test_error_fraction_answers_internal_failure(proxy: FaultProxy) -> None:
    """With error_fraction=1, botocore sees HTTP 500 InternalFailure."""
    proxy.set(error_fraction=1.0)
    error = await asyncio.to_thread(assume_role_error, proxy.url)
    assert error.response["Error"]["Code"] == "InternalFailure"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxy.stats()["assume_role_failed"] == 1


# -- latency and outages -------------------------------------------------------------------


async def test_latency_delays_each_answer(proxy: FaultProxy) -> None:
    """An answer takes at least the configured latency."""
    proxy.set(latency=0.3)
    started = time.monotonic()
    await asyncio.to_thread(assume_role, proxy.url)
    assert time.monotonic() - started >= 0.3


async def test_refuse_refuses_connections_until_pass(proxy: FaultProxy) -> None:
    """refuse closes the listener (admin API still answers); pass restores service."""
    proxy.set(mode="refuse")
    port = int(proxy.url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.admin_url + "/_fault", json={"mode": "pass"}) as response,
    ):
        assert response.status == 200
    assert (await asyncio.to_thread(assume_role, proxy.url))["AssumedRoleUser"]["Arn"] == (
        ASSUMED_ROLE_ARN
    )


async def test_refuse_set_before_start_applies_from_the_start(emulator: StsEmulator) -> None:
    """A proxy started in refuse mode never accepts a connection until pass."""
    proxy = FaultProxy(emulator.url)
    proxy.set(mode="refuse")
    async with proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        proxy.set(mode="pass")
        async with aiohttp.ClientSession() as http:
            assert await post_assume_role(http, proxy.url) == 200


async def test_blackhole_holds_requests_until_the_client_gives_up(proxy: FaultProxy) -> None:
    """A client with a 0.5 s timeout times out against a blackholed proxy."""
    proxy.set(mode="blackhole")
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with pytest.raises(TimeoutError):
            await post_assume_role(http, proxy.url)
    assert proxy.stats()["requests_held"] == 1


async def test_blackholed_requests_resume_when_mode_returns_to_pass(proxy: FaultProxy) -> None:
    """A held request is forwarded once the mode changes back to pass."""
    proxy.set(mode="blackhole")
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(post_assume_role(http, proxy.url))
        while proxy.stats()["requests_held"] == 0:
            await asyncio.sleep(0.01)
        assert not pending.done()
        proxy.set(mode="pass")
        assert await pending == 200


async def test_reset_drops_the_connection_without_an_answer(proxy: FaultProxy) -> None:
    """reset closes the connection; the client gets a connection error, not a response."""
    proxy.set(mode="reset")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await post_assume_role(http, proxy.url)
    proxy.set(mode="pass")
    await asyncio.to_thread(assume_role, proxy.url)
    assert proxy.stats()["requests_reset"] == 1


# -- admin API -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "body must be JSON"),
        ("[1, 2]", "body must be a JSON object"),
        ('{"lateness": 1}', "unknown fault 'lateness'"),
        ('{"throttle_fraction": 2.0}', "throttle_fraction must be between 0 and 1"),
        ('{"latency": -1}', "latency must be between"),
        ('{"latency": true}', "latency must be a number"),
        ('{"mode": "explode"}', "mode must be one of"),
    ],
    ids=["bad-json", "not-object", "unknown-key", "fraction-2", "negative", "bool", "bad-mode"],
)
async def test_admin_rejects_bad_faults_and_keeps_serving(
    proxy: FaultProxy, body: str, message: str
) -> None:
    """Bad admin input answers 400 with a JSON message; faults and service are unchanged."""
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.admin_url + "/_fault", data=body) as response:
            assert response.status == 400
            assert message in (await response.json())["error"]
        assert await post_assume_role(http, proxy.url) == 200
    assert proxy.stats()["faults"] == {
        "latency": 0.0,
        "jitter": 0.0,
        "throttle_fraction": 0.0,
        "error_fraction": 0.0,
        "mode": "pass",
        "refuse_code": "",
    }


def test_set_rejects_unknown_faults_without_changing_any() -> None:
    """set() raises ValueError for a bad change and applies none of the others."""
    proxy = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="error_fraction must be between 0 and 1"):
        proxy.set(latency=1.0, error_fraction=1.5)
    assert proxy.faults.latency == 0.0


async def test_admin_api_sets_faults_reports_and_resets_stats(proxy: FaultProxy) -> None:
    """POST /_fault changes faults, GET /_fault/stats counts, POST /_fault/reset zeroes."""
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.admin_url + "/_fault", json={"throttle_fraction": 1}) as set_:
            assert (await set_.json())["throttle_fraction"] == 1.0
        assert await post_assume_role(http, proxy.url) == 400
        async with http.get(proxy.admin_url + "/_fault/stats") as stats:
            assert (await stats.json())["assume_role_throttled"] == 1
        async with http.post(proxy.admin_url + "/_fault/reset") as reset:
            after = await reset.json()
    assert (after["assume_role_calls"], after["requests_total"]) == (0, 0)
    assert after["faults"]["throttle_fraction"] == 1.0


# -- call-rate timeline --------------------------------------------------------------------


def test_max_calls_in_window_uses_half_open_windows() -> None:
    """The densest [t, t + 1) window is found; a call exactly 1 s later starts a new window."""
    timeline = [0.0, 0.5, 0.99, 1.0, 1.5, 1.6, 1.7, 5.0]
    assert max_calls_in_window(timeline, 1.0) == 5  # 0.99 .. 1.7
    assert max_calls_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_calls_in_window(list(reversed(timeline)), 2.0) == 7
    assert max_calls_in_window([], 1.0) == 0


async def test_max_rate_over_a_driven_timeline(emulator: StsEmulator) -> None:
    """max_rate reports the densest window of the AssumeRole calls the proxy saw."""
    clock = ManualClock(datetime.fromtimestamp(100.0, UTC))
    async with FaultProxy(emulator.url, clock=clock) as proxy, aiohttp.ClientSession() as http:
        for at in (100.0, 100.2, 100.9, 101.1, 101.2, 101.3, 101.4, 103.0):
            clock.moment = datetime.fromtimestamp(at, UTC)
            assert await post_assume_role(http, proxy.url) == 200
        assert proxy.max_rate(1.0) == 5.0  # 100.9 .. 101.4
        assert proxy.max_rate(2.0) == 3.5  # 7 calls in [100.0, 102.0)
        assert proxy.assume_role_timeline()[-1] == 103.0


# -- command line --------------------------------------------------------------------------


def test_fault_proxy_command_serves_until_sigterm(emulator: StsEmulator) -> None:
    """`metaproxy fault-proxy` prints both URLs, forwards, and exits 0 on SIGTERM."""
    command = [sys.executable, "-m", "metaproxy", "fault-proxy", "--upstream", emulator.url]
    command += ["--throttle-fraction", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        proxy_url = process.stdout.readline().split()[1]
        admin_line = process.stdout.readline()
        error = assume_role_error(proxy_url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    assert error.response["Error"]["Code"] == "Throttling"
    assert admin_line.startswith("fault-proxy admin: http://127.0.0.1:")
