"""Shipping to S3 (moto's server on loopback, the run's emulator): the copy verifies, answers
queries, shows edits."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from metaproxy.audit import cli as audit_cli
from metaproxy.audit.query import QueryFilter, query_s3
from metaproxy.audit.record import make_record
from metaproxy.audit.ship import S3Shipper
from metaproxy.audit.signing_keys import write_keypair
from metaproxy.audit.verify import verify_dir, verify_s3
from metaproxy.audit.writer import AuditLog

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def record(n: int) -> dict[str, object]:
    return make_record(
        "issued",
        request_id=f"req-{n}",
        task=f"task-{n}",
        tenant="acme",
        role_arn="arn:aws:iam::123456789012:role/app",
        access_key_id=f"ASIAEXAMPLE{n:08d}",
        expiration="2030-01-01T00:00:00Z",
        status=200,
    )


async def _shipped_log(
    directory: Path, key: Path, bucket: str, client_factory: Callable[[], Any], count: int
) -> tuple[AuditLog, S3Shipper]:
    shipper = S3Shipper(bucket=bucket, prefix="prod/broker-a", client_factory=client_factory)
    await shipper.start()
    log = AuditLog(
        directory,
        log_id="broker-a",
        signing_key=key,
        segment_max_bytes=3000,
        checkpoint_every_records=7,
        write_timeout=10,
        on_segment_closed=shipper.enqueue,
    )
    await log.start()
    for n in range(count):
        await log.append(record(n))
    return log, shipper


async def test_shipped_copy_verifies_and_answers_queries(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """After close, S3 holds every record; verify_s3 passes and query finds an access key."""
    private, public = write_keypair(tmp_path / "keys")
    log, shipper = await _shipped_log(tmp_path / "log", private, bucket, client_factory, 60)
    await log.aclose()
    await shipper.aclose()
    url = f"s3://{bucket}/prod/broker-a"
    report = await asyncio.to_thread(verify_s3, url, public, client_factory)
    assert report.problems == []
    assert (report.ok, report.records, report.signed) == (True, 60, True)
    assert report.checkpoints == verify_dir(tmp_path / "log", public).checkpoints + 1  # + latest
    found = await asyncio.to_thread(
        query_s3, url, QueryFilter(access_key_id="ASIAEXAMPLE00000042"), client_factory
    )
    assert [(r["task"], r["seq"]) for r in found] == [("task-42", 43)]
    assert shipper.stats()["failures"] == 0


async def test_copy_with_an_open_segment_verifies(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """While the writer runs, checkpoints may name the unshipped open segment: still OK."""
    private, public = write_keypair(tmp_path / "keys")
    log, shipper = await _shipped_log(tmp_path / "log", private, bucket, client_factory, 40)
    await shipper.aclose()  # drains what was closed so far
    report = await asyncio.to_thread(
        verify_s3, f"s3://{bucket}/prod/broker-a", public, client_factory
    )
    await log.aclose()
    assert report.problems == []
    assert report.ok
    assert 0 < report.records < 40


async def test_tampering_with_the_s3_copy_is_detected(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """An edited record, a deleted middle segment or a deleted last segment in S3 all fail."""
    private, public = write_keypair(tmp_path / "keys")
    log, shipper = await _shipped_log(tmp_path / "log", private, bucket, client_factory, 60)
    await log.aclose()
    await shipper.aclose()
    s3 = client_factory()
    url = f"s3://{bucket}/prod/broker-a"
    keys = sorted(
        item["Key"]
        for item in s3.list_objects_v2(Bucket=bucket, Prefix="prod/broker-a/segment-")["Contents"]
    )
    assert len(keys) >= 4
    original = s3.get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    edited = original.replace(b"task-", b"tusk-", 1)
    s3.put_object(Bucket=bucket, Key=keys[1], Body=edited)
    report = await asyncio.to_thread(verify_s3, url, public, client_factory)
    assert not report.ok
    assert report.first_bad.startswith(keys[1].rsplit("/", 1)[1] + " line 1 ")
    s3.put_object(Bucket=bucket, Key=keys[1], Body=original)
    assert (await asyncio.to_thread(verify_s3, url, public, client_factory)).ok

    s3.delete_object(Bucket=bucket, Key=keys[2])
    report = await asyncio.to_thread(verify_s3, url, public, client_factory)
    assert not report.ok
    assert "gap" in report.problems[0]
    s3.put_object(
        Bucket=bucket, Key=keys[2], Body=(tmp_path / "log" / keys[2].rsplit("/", 1)[1]).read_bytes()
    )

    s3.delete_object(Bucket=bucket, Key=keys[-1])  # truncation: latest-checkpoint.json catches it
    report = await asyncio.to_thread(verify_s3, url, public, client_factory)
    assert not report.ok
    assert any("records deleted from the tail" in problem for problem in report.problems)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback URL that refuses connections: its port is bound, never listened on, and held
    for the test, so no other process can start listening there meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_s3_outage_never_blocks_append(tmp_path: Path, bucket: str, refused_url: str) -> None:
    """With S3 unreachable, appends still succeed promptly and the shipper only counts failures."""

    def unreachable() -> Any:
        return boto3.client(
            "s3",
            endpoint_url=refused_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    shipper = S3Shipper(
        bucket=bucket, prefix="x", client_factory=unreachable, retry_base_seconds=0.05
    )
    await shipper.start()
    log = AuditLog(
        tmp_path,
        log_id="b",
        segment_max_bytes=500,
        write_timeout=2,
        on_segment_closed=shipper.enqueue,
    )
    await log.start()
    started = time.monotonic()
    for n in range(20):
        await log.append(record(n))
    elapsed = time.monotonic() - started
    await log.aclose()
    deadline = time.monotonic() + 10
    while (stats := shipper.stats())["failures"] < 1 or stats["pending"] < 10:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.02)
    await shipper.aclose(drain_seconds=0.1)
    assert elapsed < 2.0
    assert stats["uploaded"] == 0


async def test_backfill_uploads_what_a_crash_left_behind(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """Closed segments and checkpoints never shipped are found and uploaded by backfill."""
    private, public = write_keypair(tmp_path / "keys")
    log = AuditLog(
        tmp_path / "log", log_id="b", signing_key=private, segment_max_bytes=1500, write_timeout=5
    )
    await log.start()
    for n in range(30):
        await log.append(record(n))
    await log.aclose()
    shipper = S3Shipper(bucket=bucket, prefix="p", client_factory=client_factory)
    await shipper.start()
    queued = await shipper.backfill(tmp_path / "log")
    await shipper.aclose()
    assert queued > 3
    assert shipper.stats()["uploaded"] == queued
    report = await asyncio.to_thread(verify_s3, f"s3://{bucket}/p", public, client_factory)
    assert report.problems == []
    assert report.records == 30


async def test_cli_verify_and_query_read_s3_with_env_credentials(
    tmp_path: Path,
    bucket: str,
    sts_url: str,
    client_factory: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`audit verify s3://…` and `audit query s3://…` work against the endpoint given."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    private, public = write_keypair(tmp_path / "keys")
    log, shipper = await _shipped_log(tmp_path / "log", private, bucket, client_factory, 20)
    await log.aclose()
    await shipper.aclose()
    parser = argparse.ArgumentParser(prog="metaproxy")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    url = f"s3://{bucket}/prod/broker-a"
    verify = parser.parse_args(
        ["audit", "verify", url, "--public-key", str(public), "--s3-endpoint", sts_url]
    )
    assert await asyncio.to_thread(verify.func, verify) == 0
    assert capsys.readouterr().out.startswith("OK: 20 records")
    query = parser.parse_args(
        ["audit", "query", url, "--s3-endpoint", sts_url, "--task", "task-7", "--json"]
    )
    assert await asyncio.to_thread(query.func, query) == 0
    assert json.loads(capsys.readouterr().out)["access_key_id"] == "ASIAEXAMPLE00000007"


async def test_shipped_files_are_pruned_locally_and_the_chain_resumes(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """Once in S3 a segment or checkpoint leaves the local folder (the newest of each stays);
    the S3 copy verifies and a restart continues the chain where it was."""
    private, public = write_keypair(tmp_path / "keys")
    holder: list[AuditLog] = []

    async def prune(path: Path) -> None:
        await holder[0].prune(path)

    shipper = S3Shipper(
        bucket=bucket, prefix="prod/broker-a", client_factory=client_factory, on_uploaded=prune
    )
    await shipper.start()
    log = AuditLog(
        tmp_path / "log",
        log_id="broker-a",
        signing_key=private,
        segment_max_bytes=3000,
        checkpoint_every_records=7,
        write_timeout=10,
        on_segment_closed=shipper.enqueue,
    )
    holder.append(log)
    await log.start()
    for n in range(60):
        await log.append(record(n))
    await log.aclose()
    await shipper.aclose()
    local_segments = list((tmp_path / "log").glob("segment-*.jsonl"))
    local_checkpoints = list((tmp_path / "log" / "checkpoints").glob("checkpoint-*.json"))
    assert (len(local_segments), len(local_checkpoints)) == (1, 1)
    report = await asyncio.to_thread(
        verify_s3, f"s3://{bucket}/prod/broker-a", public, client_factory
    )
    assert (report.ok, report.records) == (True, 60), report.problems
    again = AuditLog(tmp_path / "log", log_id="broker-a", signing_key=private, write_timeout=10)
    await again.start()
    assert (await again.append(record(60)))["seq"] == 61
    await again.aclose()
