"""The broker's audit log in operation: shipped to S3 where it verifies, and fail-closed issuing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest

from metaproxy.audit.names import segment_name
from metaproxy.broker.server import BrokerServer
from tests.support import Pki, broker_config, hang_audit_disk, issue, run_command


async def ask(
    https: aiohttp.ClientSession, broker: BrokerServer, token: str
) -> tuple[int, str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(broker.url + "/v1/credentials", json={}, headers=headers) as answer:
        text = await answer.text()
        return answer.status, text, json.loads(text)


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


async def audit_cli(*argv: str) -> tuple[int, str, str]:
    return await run_command(
        sys.executable, "-m", "metaproxy", "audit", *argv, env=dict(os.environ)
    )


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_audit_segments_ship_to_s3_and_verify_and_answer_queries_there(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """After the broker closes, its S3 copy (under its instance prefix) verifies and answers."""
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(s3_client(sts_url).create_bucket, Bucket=bucket)
    config = broker_config(
        tmp_path,
        pki,
        sts_url,
        policies_dir,
        audit_s3_url=f"s3://{bucket}/audit",
        s3_endpoint=sts_url,
    )
    broker = await BrokerServer.start(config)
    status, _, body = await ask(https, broker, issue(pki, "s3-task", "acme"))
    assert status == 200
    assert (await ask(https, broker, issue(pki, "s3-other", "globex")))[0] == 200
    record_secrets(broker)
    await broker.aclose()

    listing = await asyncio.to_thread(
        s3_client(sts_url).list_objects_v2, Bucket=bucket, Prefix="audit/"
    )
    keys = {item["Key"] for item in listing.get("Contents", [])}
    assert "audit/test-broker/segment-000000000001.jsonl" in keys
    assert "audit/test-broker/latest-checkpoint.json" in keys

    copy = f"s3://{bucket}/audit/test-broker"
    rc, out, err = await audit_cli(
        "verify", copy, "--s3-endpoint", sts_url, "--public-key", str(pki.audit_pub)
    )
    assert rc == 0, out + err
    assert out.startswith("OK: 2 records") and "(signed)" in out

    access_key_id = body["credentials"]["access_key_id"]
    rc, out, err = await audit_cli(
        "query", copy, "--s3-endpoint", sts_url, "--access-key-id", access_key_id, "--json"
    )
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["event"], r["task"], r["tenant"]) for r in records] == [
        ("issued", "s3-task", "acme")
    ]


@pytest.mark.serial  # asserts an answer within 2 s
async def test_s3_outage_never_blocks_issuing(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """With S3 unreachable the broker starts, issues at normal speed and still stops in time."""
    config = broker_config(
        tmp_path,
        pki,
        sts_url,
        policies_dir,
        audit_s3_url="s3://nowhere/audit",
        s3_endpoint="http://127.0.0.1:9",  # discard port: connections are refused
    )
    broker = await BrokerServer.start(config)
    started = time.monotonic()
    status, _, _ = await ask(https, broker, issue(pki, "s3-down", "acme"))
    assert status == 200
    assert time.monotonic() - started < 2.0
    record_secrets(broker)
    started = time.monotonic()
    await broker.aclose()
    assert time.monotonic() - started < config.drain_seconds + 2.0


@pytest.mark.serial  # asserts a refusal within 1 s
async def test_stalled_audit_writes_refuse_credentials_then_recover(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """While the audit disk hangs, requests get 503 within a second and no credentials leave."""
    assert (await ask(https, broker, issue(pki, "fc-warm", "acme")))[0] == 200
    token = issue(pki, "fc-cold", "acme")
    stall = hang_audit_disk(broker.audit.writer)
    try:
        started = time.monotonic()
        status, refused_text, refused = await ask(https, broker, token)
        elapsed = time.monotonic() - started
        again, _, _ = await ask(https, broker, token)
    finally:
        stall.set()
    assert (status, refused["code"], again) == (503, "AuditUnavailable", 503)
    assert elapsed < 1.0
    assert "credentials" not in refused

    await asyncio.sleep(0.1)
    status, _, body = await ask(https, broker, token)
    assert status == 200
    # STS did answer during the stall (the set is cached), but none of it left the broker.
    secret = body["credentials"]["secret_access_key"]
    assert secret not in refused_text
    assert body["credentials"]["access_key_id"] not in refused_text


@pytest.mark.serial  # asserts a refusal within 1 s
async def test_unwritable_audit_segment_refuses_credentials_then_recovers(
    broker: BrokerServer, https: aiohttp.ClientSession, pki: Pki
) -> None:
    """If the audit segment cannot be created, requests get 503 fast; then issuing resumes"""
    blocker = broker.config.audit_dir / segment_name(1)
    blocker.mkdir()  # root ignores permissions, but nobody can open a directory for writing
    token = issue(pki, "fc-unwritable", "acme")
    try:
        started = time.monotonic()
        status, _, refused = await ask(https, broker, token)
        assert time.monotonic() - started < 1.0
    finally:
        blocker.rmdir()
    assert (status, refused["code"]) == (503, "AuditUnavailable")
    assert "credentials" not in refused
    status, _, body = await ask(https, broker, token)
    assert status == 200 and body["credentials"]["access_key_id"].startswith("ASIA")


async def test_a_full_local_audit_buffer_refuses_credentials(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
    record_secrets: Callable[[BrokerServer], None],
) -> None:
    """--audit-max-local-bytes bounds the unshipped audit log: past it, 503 and no credentials."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir, audit_max_local_bytes=1)
    broker = await BrokerServer.start(config)
    try:
        statuses = [await ask(https, broker, issue(pki, f"fc-full-{i}", "acme")) for i in range(2)]
        record_secrets(broker)
    finally:
        await broker.aclose()
    assert [status for status, _, _ in statuses] == [200, 503]
    assert statuses[1][2]["code"] == "AuditUnavailable"
    assert "credentials" not in statuses[1][2]
