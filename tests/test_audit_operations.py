"""The audit tools as the security team uses them: a live tail from an unanchored past, a wrong
key from a missing checkpoint, a mixed folder refused, and `tail`/`query` across fleets and S3
(moto's server on loopback)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from metaproxy.audit import cli as audit_cli
from metaproxy.audit.record import make_record
from metaproxy.audit.ship import S3Shipper
from metaproxy.audit.signing_keys import write_keypair
from metaproxy.audit.verify import verify_dir
from metaproxy.audit.writer import AuditLog


class SetClock:
    """Wall time the test sets; monotonic time that only moves forward."""

    def __init__(self, start: datetime) -> None:
        self.moment = start
        self.ticks = 0.0

    def now(self) -> datetime:
        return self.moment

    def monotonic(self) -> float:
        self.ticks += 0.001
        return self.ticks


def _record(n: int, instance: str = "broker-a") -> dict[str, object]:
    return make_record(
        "denied" if n % 3 == 2 else "issued",
        request_id=f"{instance}-req-{n}",
        task=f"task-{n}",
        tenant="acme",
        role_arn="arn:aws:iam::123456789012:role/app",
        access_key_id="" if n % 3 == 2 else f"ASIA{n:016d}",
        rule="tenant-acme/app" if n % 3 != 2 else "no-matching-rule",
        reason="policy denies the role" if n % 3 == 2 else "",
        instance=instance,
        status=403 if n % 3 == 2 else 200,
    )


async def _write(
    directory: Path, key: Path | None, count: int, *, clock: SetClock | None = None, first: int = 0
) -> None:
    log = AuditLog(directory, log_id=directory.name, signing_key=key, write_timeout=10, clock=clock)
    await log.start()
    for n in range(first, first + count):
        if clock is not None:
            clock.moment += timedelta(seconds=1)
        await log.append(_record(n, directory.name))
    await log.aclose()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="metaproxy")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


async def test_a_live_tail_passes_with_a_note_and_an_old_unanchored_one_fails(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A running broker's records not checkpointed yet: OK with a note; the same records with
    no checkpoint once older than the interval: FAILED."""
    private, public = keys
    log = AuditLog(tmp_path / "live", log_id="broker-a", signing_key=private, write_timeout=10)
    await log.start()
    try:
        for n in range(5):
            await log.append(_record(n))
        assert not list((tmp_path / "live" / "checkpoints").glob("checkpoint-*.json"))
        assert (
            run_cli(["audit", "verify", str(tmp_path / "live"), "--public-key", str(public)]) == 0
        )
        out = capsys.readouterr().out
        assert "note: live tail: seq 1..5: covered by no checkpoint yet" in out
        assert "OK: 5 records" in out
        later = datetime.now(UTC) + timedelta(seconds=60 + 30 + 5)
        report = verify_dir(tmp_path / "live", public, now=later)
        assert not report.ok
        assert "checkpoints deleted, or the log rewritten" in report.problems[0]
    finally:
        await log.aclose()


async def test_a_log_whose_checkpoints_were_deleted_fails_once_older_than_the_interval(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Records written two hours ago and their checkpoints deleted: FAILED, saying why."""
    private, public = keys
    clock = SetClock(datetime.now(UTC) - timedelta(hours=2))
    await _write(tmp_path / "broker-a", private, 6, clock=clock)
    target = str(tmp_path / "broker-a")
    assert run_cli(["audit", "verify", target, "--public-key", str(public)]) == 0
    assert "note:" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "broker-a" / "checkpoints")
    assert run_cli(["audit", "verify", target, "--public-key", str(public)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 problem(s)" in out
    assert "seq 1..6: covered by no checkpoint" in out
    assert "longer than the checkpoint interval (60 s + 30 s)" in out
    assert run_cli(["audit", "verify", target, "--allow-unanchored"]) == 0


async def test_a_wrong_public_key_is_a_key_mismatch_not_a_missing_checkpoint(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Verified with another key: one key-mismatch problem naming both keys, and nothing about
    checkpoints missing or records unanchored."""
    private, _ = keys
    _, other = write_keypair(tmp_path / "other")
    await _write(tmp_path / "broker-a", private, 4)
    assert run_cli(["audit", "verify", str(tmp_path / "broker-a"), "--public-key", str(other)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: 1 problem(s); first bad: checkpoint-")
    assert "key mismatch: signed by key" in out
    assert "no checkpoints found" not in out
    assert "covered by no checkpoint" not in out


async def test_a_log_across_an_audit_key_rotation_verifies_with_both_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints signed by the old key, then by the new: both keys given verify it; the new
    key alone names the old key's checkpoints as a key mismatch."""
    old_private, old_public = write_keypair(tmp_path / "old")
    new_private, new_public = write_keypair(tmp_path / "new")
    await _write(tmp_path / "broker-a", old_private, 3)
    await _write(tmp_path / "broker-a", new_private, 3, first=3)
    target = str(tmp_path / "broker-a")
    both = ["--public-key", str(old_public), "--public-key", str(new_public)]
    assert run_cli(["audit", "verify", target, *both]) == 0
    assert capsys.readouterr().out.startswith("OK: 6 records, 2 checkpoints (signed)")
    assert run_cli(["audit", "verify", target, "--public-key", str(new_public)]) == 1
    out = capsys.readouterr().out
    assert "key mismatch" in out and "the audit key was rotated" in out


async def test_a_folder_mixing_one_chain_and_replica_chains_is_an_error(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A single broker's chain beside replica chains: verify, query and tail refuse, naming
    what they found; --single and --fleet each read the part asked for."""
    private, public = keys
    mixed = tmp_path / "state"
    await _write(mixed, private, 3)
    await _write(mixed / "broker-1", private, 2)
    await _write(mixed / "broker-2", private, 2)
    for command in (["verify", "--public-key", str(public)], ["query"], ["tail"]):
        assert run_cli(["audit", command[0], str(mixed), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "one broker's chain (1 segment(s) at the top)" in err
        assert "2 replica chain(s) (broker-1/, broker-2/)" in err
        assert "--fleet" in err and "--single" in err
    assert run_cli(["audit", "verify", str(mixed), "--public-key", str(public), "--single"]) == 0
    assert capsys.readouterr().out.startswith("OK: 3 records")
    assert run_cli(["audit", "verify", str(mixed), "--public-key", str(public), "--fleet"]) == 0
    assert capsys.readouterr().out.startswith("OK: 2 replicas, 4 records")


async def test_tail_merges_a_fleet_in_time_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit tail` on a fleet folder prints the newest records of all replicas, by time."""
    clock = SetClock(datetime(2026, 3, 4, 14, 0, tzinfo=UTC))
    await _write(tmp_path / "fleet" / "broker-1", None, 3, clock=clock)
    await _write(tmp_path / "fleet" / "broker-2", None, 3, clock=clock, first=3)
    assert run_cli(["audit", "tail", str(tmp_path / "fleet"), "-n", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["instance"], r["task"]) for r in records] == [
        ("broker-1", "task-2"),
        ("broker-2", "task-3"),
        ("broker-2", "task-4"),
        ("broker-2", "task-5"),
    ]


async def test_tail_and_query_read_a_fleet_shipped_to_s3(
    tmp_path: Path,
    bucket: str,
    sts_url: str,
    client_factory: Callable[[], Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`audit tail s3://…` and `audit query s3://…` read every replica's shipped chain; query's
    table shows each record's rule, reason and broker instance."""
    clock = SetClock(datetime(2026, 3, 4, 14, 0, tzinfo=UTC))
    for first, instance in ((0, "broker-1"), (3, "broker-2")):
        shipper = S3Shipper(bucket=bucket, prefix=f"prod/{instance}", client_factory=client_factory)
        await shipper.start()
        log = AuditLog(
            tmp_path / instance,
            log_id=instance,
            write_timeout=10,
            clock=clock,
            on_segment_closed=shipper.enqueue,
        )
        await log.start()
        for n in range(first, first + 3):
            clock.moment += timedelta(seconds=1)
            await log.append(_record(n, instance))
        await log.aclose()
        await shipper.aclose()
    url = f"s3://{bucket}/prod"
    tail = ["audit", "tail", url, "-n", "2", "--s3-endpoint", sts_url]
    assert await asyncio.to_thread(run_cli, tail) == 0
    assert [json.loads(line)["task"] for line in capsys.readouterr().out.splitlines()] == [
        "task-4",
        "task-5",
    ]
    assert await asyncio.to_thread(run_cli, [*tail, "--follow"]) == 2
    assert "--follow needs a directory" in capsys.readouterr().err
    query = ["audit", "query", url, "--event", "denied", "--s3-endpoint", sts_url]
    assert await asyncio.to_thread(run_cli, query) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split()
    for column in ("rule", "reason", "instance", "operator"):
        assert column in header
    assert len(table) == 3  # task-2 on broker-1, task-5 on broker-2
    assert "no-matching-rule" in table[1] and "policy denies the role" in table[1]
    assert "broker-1" in table[1] and "broker-2" in table[2]


FOLLOW = """
import argparse, sys
from metaproxy.audit import cli
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


async def test_tail_follow_on_a_fleet_follows_every_replica_and_one_that_joins(
    tmp_path: Path,
) -> None:
    """`audit tail --follow` on a fleet folder prints what each replica writes after it
    started, a replica that appears later included."""
    fleet = tmp_path / "fleet"
    await _write(fleet / "broker-1", None, 1)
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-c", FOLLOW, "audit", "tail", str(fleet), "-n", "1", "--follow"),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert follower.stdout is not None
        async with asyncio.timeout(30):
            assert json.loads(await follower.stdout.readline())["task"] == "task-0"
        await _write(fleet / "broker-1", None, 1, first=1)
        await _write(fleet / "broker-2", None, 1, first=2)
        seen: set[tuple[str, str]] = set()
        async with asyncio.timeout(15):
            while len(seen) < 2:
                record = json.loads(await follower.stdout.readline())
                seen.add((record["instance"], record["task"]))
        assert seen == {("broker-1", "task-1"), ("broker-2", "task-2")}
    finally:
        follower.kill()
        await follower.wait()


async def test_a_mixed_s3_prefix_is_an_error_naming_the_url(
    tmp_path: Path,
    bucket: str,
    sts_url: str,
    client_factory: Callable[[], Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One broker shipped to `prefix/` and a replica to `prefix/broker-1/`: verify and query
    refuse the prefix, naming it and what it holds."""
    for prefix, name in (("mixed", "single"), ("mixed/broker-1", "broker-1")):
        shipper = S3Shipper(bucket=bucket, prefix=prefix, client_factory=client_factory)
        await shipper.start()
        log = AuditLog(
            tmp_path / name, log_id=name, write_timeout=10, on_segment_closed=shipper.enqueue
        )
        await log.start()
        await log.append(_record(0, name))
        await log.aclose()
        await shipper.aclose()
    url = f"s3://{bucket}/mixed"
    for command in ("verify", "query"):
        argv = ["audit", command, url, "--s3-endpoint", sts_url]
        assert await asyncio.to_thread(run_cli, argv) == 2
        err = capsys.readouterr().err
        assert f"{url} holds one broker's chain" in err, err
        assert "1 replica chain(s) (broker-1/)" in err
