"""Cross-witnessing across a broker fleet: witness statements are signed, and a fleet copy in
S3 (moto's server on loopback) fails verification when a replica's chain or tail is deleted."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from metaproxy.audit import cli as audit_cli
from metaproxy.audit.checkpoint import (
    Witness,
    WitnessedCheckpoint,
    file_digest,
    parse_checkpoint,
    sign_checkpoint,
    signature_problem,
)
from metaproxy.audit.fleet import FleetReport, verify_fleet_dir, verify_fleet_s3
from metaproxy.audit.query import QueryFilter, query_dir
from metaproxy.audit.record import make_record
from metaproxy.audit.s3copy import download_s3
from metaproxy.audit.ship import S3Shipper
from metaproxy.audit.signing_keys import write_keypair
from metaproxy.audit.verify import verify_s3
from metaproxy.audit.writer import AuditLog

INSTANCES = ("broker-1", "broker-2", "broker-3")
HEAD = "ab" * 32
KEY = Ed25519PrivateKey.generate()

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
witnesses = st.dictionaries(
    st.text(min_size=1, max_size=20).filter(lambda name: name != "self"),
    st.builds(Witness, st.integers(1, 2**53), hex64, hex64),
    max_size=5,
)


def _sign(witness: dict[str, Witness] | None = None) -> bytes:
    checkpoint = sign_checkpoint(
        KEY,
        log_id="self",
        seq=7,
        head=HEAD,
        time="2026-01-02T03:04:05.678Z",
        segment="segment-000000000001.jsonl",
        witness=witness,
    )
    return checkpoint.to_bytes() + b"\n"


def test_a_checkpoint_without_witnesses_keeps_the_existing_byte_format() -> None:
    """No witness (None or empty) writes exactly the seven fields logs have always had."""
    data = _sign(None)
    assert data == _sign({})
    assert sorted(json.loads(data)) == ["head", "key_id", "log_id", "segment", "seq", "sig", "time"]
    assert signature_problem(parse_checkpoint(data), KEY.public_key()) is None


@given(witnesses)
def test_witness_statements_round_trip_canonically_and_verify(
    witness: dict[str, Witness],
) -> None:
    """Any witness map parses back to itself, in one byte form whatever the insertion order."""
    data = _sign(witness)
    parsed = parse_checkpoint(data)
    assert dict(witness) == dict(parsed.witness)
    assert data == _sign(dict(reversed(list(witness.items()))))
    assert signature_problem(parsed, KEY.public_key()) is None


@given(witnesses.filter(bool), st.data())
def test_changing_any_witness_statement_breaks_the_signature(
    witness: dict[str, Witness], data: st.DataObject
) -> None:
    """Dropping, re-pointing or re-digesting a witnessed checkpoint invalidates the signature."""
    signed = parse_checkpoint(_sign(witness))
    name = data.draw(st.sampled_from(sorted(witness)))
    entry = witness[name]
    other_digest = "f" * 64 if entry.digest != "f" * 64 else "e" * 64
    altered = [
        {k: v for k, v in witness.items() if k != name},
        {**witness, name: Witness(entry.seq + 1, entry.head, entry.digest)},
        {**witness, name: Witness(entry.seq, entry.head, other_digest)},
        {**witness, name + "x": entry},
    ]
    for changed in altered:
        forged = dataclasses.replace(signed, witness=changed)
        assert signature_problem(forged, KEY.public_key()) == "bad signature"


@pytest.mark.parametrize(
    "witness",
    [
        {},
        {"self": {"seq": 1, "head": HEAD, "digest": HEAD}},
        {"other": {"seq": 0, "head": HEAD, "digest": HEAD}},
        {"other": {"seq": 1, "head": HEAD, "digest": "xyz"}},
        {"other": {"seq": 1, "head": HEAD, "digest": HEAD, "time": "now"}},
        {"other": [1, HEAD, HEAD]},
    ],
    ids=["empty", "own-log", "seq-0", "bad-digest", "extra-field", "not-an-object"],
)
def test_malformed_witness_fields_are_refused(witness: dict[str, Any]) -> None:
    """A witness field that the writer would never produce makes the checkpoint invalid."""
    raw = json.loads(_sign())
    raw["witness"] = witness
    data = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    with pytest.raises(ValueError):
        parse_checkpoint(data)


# ---- three replicas shipping to S3 ----------------------------------------------------------


class Registry:
    """Stands in for the broker's store: each replica's latest published checkpoint."""

    def __init__(self) -> None:
        self.latest: dict[str, WitnessedCheckpoint] = {}

    async def checkpoints(self) -> dict[str, WitnessedCheckpoint]:
        return dict(self.latest)  # our own entry included: the writer must drop it

    def publisher(self, instance: str) -> Callable[[WitnessedCheckpoint], Awaitable[None]]:
        async def publish(checkpoint: WitnessedCheckpoint) -> None:
            self.latest[instance] = checkpoint

        return publish


def _record(instance: str, n: int) -> dict[str, object]:
    return make_record(
        "issued",
        request_id=f"{instance}-req-{n}",
        task=f"{instance}-task-{n}",
        tenant="acme",
        role_arn="arn:aws:iam::123456789012:role/app",
        access_key_id=f"ASIA{instance[-1]}{n:015d}",
        status=200,
    )


async def _run_fleet(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any], private: Path
) -> Registry:
    """Three replicas append in turn, then close in order 1, 2, 3, each shipping its chain."""
    registry = Registry()
    replicas: list[tuple[AuditLog, S3Shipper]] = []
    for instance in INSTANCES:
        shipper = S3Shipper(
            bucket=bucket, prefix=f"fleet/{instance}", client_factory=client_factory
        )
        await shipper.start()
        log = AuditLog(
            tmp_path / instance,
            log_id=instance,
            signing_key=private,
            segment_max_bytes=2500,
            checkpoint_every_records=6,
            # No time-based checkpoints (they could pre-empt the final one at close); the
            # maintenance tick (1 s) still refreshes each replica's view of the others.
            checkpoint_every_seconds=600,
            write_timeout=10,
            on_segment_closed=shipper.enqueue,
            witness=registry.checkpoints,
            on_checkpoint=registry.publisher(instance),
        )
        await log.start()
        replicas.append((log, shipper))
    for n in range(40):
        for instance, (log, _) in zip(INSTANCES, replicas, strict=True):
            await log.append(_record(instance, n))
        if n == 19:
            await asyncio.sleep(1.2)  # a maintenance tick: later checkpoints witness others
    for log, shipper in replicas:
        await log.aclose()
        await shipper.aclose()
        assert shipper.stats()["failures"] == 0
    return registry


def _objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listed
    }


def _local(tmp_path: Path, key: str) -> bytes:
    """The replica's own file behind an object key `fleet/<instance>/...`."""
    return (tmp_path / key.split("/", 1)[1]).read_bytes()


async def _verify(url: str, public: Path, client_factory: Callable[[], Any]) -> FleetReport:
    return await asyncio.to_thread(verify_fleet_s3, url, public, client_factory)


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_a_deleted_replica_chain_or_tail_fails_fleet_verification(
    tmp_path: Path, bucket: str, client_factory: Callable[[], Any]
) -> None:
    """Intact fleet OK; deleting a replica's prefix, or its tail and newest checkpoint, or
    editing a record, each fails and names the replica."""
    private, public = write_keypair(tmp_path / "keys")
    registry = await _run_fleet(tmp_path, bucket, client_factory, private)
    assert sorted(registry.latest) == list(INSTANCES)
    url, s3 = f"s3://{bucket}/fleet", client_factory()

    report = await _verify(url, public, client_factory)
    assert report.problems == []
    assert (report.ok, len(report.replicas), report.records) == (True, 3, 120)
    assert report.signed and report.witnessed > 0

    # A whole replica gone: its own chain cannot say so, broker-3's final checkpoint does.
    gone = _objects(s3, bucket, "fleet/broker-2/")
    for key in gone:
        s3.delete_object(Bucket=bucket, Key=key)
    report = await _verify(url, public, client_factory)
    assert not report.ok
    assert report.problems[0].startswith(
        "replica broker-2: chain missing from the copy, witnessed by broker-3 at its checkpoint"
    )
    for key, body in gone.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    assert (await _verify(url, public, client_factory)).ok

    # broker-1's last segment, its last checkpoint and latest-checkpoint.json gone: alone, the
    # rest still verifies as a copy whose newest segment was never shipped.
    keys = sorted(_objects(s3, bucket, "fleet/broker-1/"))
    last_segment = [k for k in keys if "/segment-" in k][-1]
    last_checkpoint = [k for k in keys if "/checkpoints/" in k][-1]
    latest = "fleet/broker-1/latest-checkpoint.json"
    for key in (last_segment, last_checkpoint, latest):
        s3.delete_object(Bucket=bucket, Key=key)
    alone = await asyncio.to_thread(verify_s3, f"{url}/broker-1", public, client_factory)
    assert alone.problems == []
    report = await _verify(url, public, client_factory)
    assert not report.ok
    checkpoint_file = last_checkpoint.rsplit("/", 1)[1]
    assert any(
        problem.startswith(f"replica broker-1: {checkpoint_file} missing from the copy")
        and "witnessed by broker-" in problem
        for problem in report.problems
    ), report.problems
    for key in (last_segment, last_checkpoint):
        s3.put_object(Bucket=bucket, Key=key, Body=_local(tmp_path, key))
    s3.put_object(Bucket=bucket, Key=latest, Body=_local(tmp_path, last_checkpoint))
    assert (await _verify(url, public, client_factory)).ok

    # An edit inside one chain is still found at its record.
    segment = sorted(k for k in _objects(s3, bucket, "fleet/broker-3/") if "/segment-" in k)[1]
    original = s3.get_object(Bucket=bucket, Key=segment)["Body"].read()
    s3.put_object(Bucket=bucket, Key=segment, Body=original.replace(b"acme", b"acne", 1))
    report = await _verify(url, public, client_factory)
    assert not report.ok
    assert report.first_bad.startswith("broker-3/" + segment.rsplit("/", 1)[1] + " line 1 ")


async def test_fleet_query_and_cli_span_every_replica(
    tmp_path: Path,
    bucket: str,
    sts_url: str,
    client_factory: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`audit verify` and `audit query` on a fleet prefix cover all replicas, in time order."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    private, public = write_keypair(tmp_path / "keys")
    await _run_fleet(tmp_path, bucket, client_factory, private)
    copy = tmp_path / "copy"
    assert await asyncio.to_thread(download_s3, f"s3://{bucket}/fleet", client_factory, copy) > 0
    assert verify_fleet_dir(copy, public, unshipped_tail_ok=True).ok

    found = query_dir(copy, QueryFilter(task="broker-2-task-5"))
    assert [(r["instance"], r["seq"]) for r in found] == [("broker-2", 6)]
    merged = query_dir(copy, QueryFilter(tenant="acme"))
    assert len(merged) == 120
    assert [r["time"] for r in merged] == sorted(str(r["time"]) for r in merged)
    assert {r["instance"] for r in merged} == set(INSTANCES)

    parser = argparse.ArgumentParser(prog="metaproxy")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    url = f"s3://{bucket}/fleet"
    verify = parser.parse_args(
        ["audit", "verify", url, "--public-key", str(public), "--s3-endpoint", sts_url]
    )
    assert await asyncio.to_thread(verify.func, verify) == 0
    assert capsys.readouterr().out.startswith("OK: 3 replicas, 120 records, ")
    query = parser.parse_args(
        ["audit", "query", url, "--s3-endpoint", sts_url, "--access-key-id", "ASIA3000000000000007"]
    )
    assert await asyncio.to_thread(query.func, query) == 0
    assert "broker-3-task-7" in capsys.readouterr().out

    empty = tmp_path / "emptied"
    empty.mkdir()
    forced = parser.parse_args(["audit", "verify", str(empty), "--fleet"])
    assert forced.func(forced) == 1
    assert "no replica chains found" in capsys.readouterr().out


async def test_a_failing_witness_source_never_stops_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A witness source that raises or hangs, and a publisher that raises, cost only witnesses."""
    private, public = write_keypair(tmp_path / "keys")
    published: list[WitnessedCheckpoint] = []

    async def broken() -> dict[str, WitnessedCheckpoint]:
        raise ConnectionError("store unreachable")

    async def hanging() -> dict[str, WitnessedCheckpoint]:
        await asyncio.sleep(3600)
        return {}

    async def publish(checkpoint: WitnessedCheckpoint) -> None:
        published.append(checkpoint)
        raise ConnectionError("store unreachable")

    for name, source in (("raises", broken), ("hangs", hanging)):
        directory = tmp_path / name
        log = AuditLog(
            directory,
            log_id=name,
            signing_key=private,
            checkpoint_every_records=5,
            checkpoint_every_seconds=600,
            write_timeout=10,
            witness=source,
            witness_timeout=0.05,
            on_checkpoint=publish,
        )
        with caplog.at_level(logging.WARNING, logger="metaproxy.audit"):
            await log.start()
            for n in range(12):
                await log.append(_record(name, n))
            await asyncio.wait_for(log.aclose(), timeout=5)
        files = sorted((directory / "checkpoints").iterdir())
        assert [int(path.name[11:23]) for path in files] == [5, 10, 12]
        assert all(parse_checkpoint(path.read_bytes()).witness == {} for path in files)
        # Newest wins when publishes queue up, so some may be skipped, never the final one.
        digests = {int(path.name[11:23]): file_digest(path.read_bytes()) for path in files}
        mine = [(cp.seq, cp.digest) for cp in published if cp.log_id == name]
        assert mine[-1] == (12, digests[12])
        assert all(digests[seq] == digest for seq, digest in mine)
    report = verify_fleet_dir(tmp_path, public)
    assert (report.ok, [r.name for r in report.replicas]) == (True, ["hangs", "raises"])
    messages = [record.getMessage() for record in caplog.records]
    assert any("witness source failed (ConnectionError)" in message for message in messages)
    assert any("witness source failed (TimeoutError)" in message for message in messages)
    assert any("not published for witnessing (ConnectionError)" in message for message in messages)
