"""The fault proxy records which access key signed each request, S3 as well as STS: moto checks
no signature, so this is how a test proves which credentials a client used."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import boto3
import pytest
from botocore.config import Config

from metaproxy.testing.emulator import StsEmulator
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.recording import RecordedRequest

NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})
SIGV2 = Config(signature_version="s3")  # S3's legacy signature: `AWSAccessKeyId=` in the query


@pytest.fixture(scope="module")
def emulator() -> Iterator[StsEmulator]:
    with StsEmulator() as running:
        yield running


@pytest.fixture
async def proxy(emulator: StsEmulator) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(emulator.url) as running:
        yield running


def session(access_key: str) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key="testing", region_name="us-east-1"
    )


def signed_calls(url: str) -> str:
    """STS signed by one key and S3 by another (SigV4 headers); a SigV2 presigned URL by a third."""
    session("AKIASTSCALLER").client(
        "sts", endpoint_url=url, config=NO_RETRIES
    ).get_caller_identity()
    s3 = session("AKIAS3WRITER").client("s3", endpoint_url=url, config=NO_RETRIES)
    s3.create_bucket(Bucket="recorded")
    s3.put_object(Bucket="recorded", Key="a/b", Body=b"x")
    presigner = session("AKIAPRESIGNER").client("s3", endpoint_url=url, config=SIGV2)
    presigned: str = presigner.generate_presigned_url(
        "get_object", Params={"Bucket": "recorded", "Key": "a/b"}
    )
    return presigned


async def test_every_request_is_recorded_with_the_key_that_signed_it(proxy: FaultProxy) -> None:
    """SigV4-signed STS and S3 calls, a SigV2 presigned GET and an unsigned GET, in order."""
    presigned = await asyncio.to_thread(signed_calls, proxy.url)
    async with aiohttp.ClientSession() as http:
        for url in (presigned, proxy.url + "/recorded"):
            async with http.get(url) as response:
                await response.read()
    seen = [(r.method, r.path, r.access_key_id) for r in proxy.recorded_requests()]
    assert seen == [
        ("POST", "/", "AKIASTSCALLER"),
        ("PUT", "/recorded", "AKIAS3WRITER"),
        ("PUT", "/recorded/a/b", "AKIAS3WRITER"),
        ("GET", "/recorded/a/b", "AKIAPRESIGNER"),
        ("GET", "/recorded", ""),
    ]


async def test_admin_calls_are_not_recorded_and_reset_clears_the_record(
    proxy: FaultProxy,
) -> None:
    """The admin API is no client's request; reset_counters() forgets what was recorded."""
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/") as response:
            await response.read()
        async with http.get(proxy.admin_url + "/_fault/stats") as response:
            assert response.status == 200
    recorded = proxy.recorded_requests()
    assert [(r.method, r.path) for r in recorded] == [("GET", "/")]
    assert isinstance(recorded[0], RecordedRequest)
    proxy.reset_counters()
    assert proxy.recorded_requests() == []
