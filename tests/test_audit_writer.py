"""The audit writer: chaining, fsync'd appends, rotation, restart and fail-closed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metaproxy.audit import chain
from metaproxy.audit.names import CHECKPOINT_DIR, checkpoint_name, segment_name, sorted_segments
from metaproxy.audit.record import make_record
from metaproxy.audit.signing_keys import write_keypair
from metaproxy.audit.verify import verify_dir
from metaproxy.audit.writer import AuditLog
from metaproxy.errors import AuditUnavailable
from tests.support import cannot_run, hang_audit_disk


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


def issued(n: int, **extra: str) -> dict[str, object]:
    fields = {"task": f"task-{n}", "tenant": "acme", "role_arn": "arn:aws:iam::1:role/app"}
    fields.update(extra)
    return make_record("issued", request_id=f"req-{n}", **fields)


async def test_appends_form_a_chain_that_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Records get seq 1.., prev links and hashes, and the directory verifies with the key."""
    log = AuditLog(tmp_path / "audit", log_id="broker-a", signing_key=keys[0], write_timeout=5)
    await log.start()
    first = await log.append(issued(1))
    second = await log.append(issued(2))
    await log.aclose()
    assert (first["seq"], first["prev"]) == (1, chain.ZERO_HASH)
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert isinstance(first["time"], str) and first["time"].endswith("Z")
    report = verify_dir(tmp_path / "audit", keys[1])
    assert (report.ok, report.records, report.checkpoints, report.signed) == (True, 2, 1, True)
    assert log.stats()["records"] == 2


async def test_append_refuses_writer_owned_fields(tmp_path: Path) -> None:
    """A caller cannot choose seq, prev or hash."""
    log = AuditLog(tmp_path, log_id="b", write_timeout=5)
    await log.start()
    with pytest.raises(ValueError, match="must not set"):
        await log.append({**issued(1), "seq": 7})
    await log.aclose()


async def test_rotation_by_size_and_checkpoints_every_n(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Segments rotate by size, the chain continues across them, checkpoints come every N."""
    closed: list[str] = []
    log = AuditLog(
        tmp_path,
        log_id="b",
        signing_key=keys[0],
        segment_max_bytes=2000,
        checkpoint_every_records=10,
        write_timeout=5,
        on_segment_closed=lambda path: closed.append(path.name),
    )
    await log.start()
    for n in range(50):
        await log.append(issued(n))
    await log.aclose()
    segments = sorted(p.name for p in tmp_path.glob("segment-*.jsonl"))
    assert len(segments) > 3
    assert segments[0] == "segment-000000000001.jsonl"
    checkpoint_seqs = [int(name[11:23]) for name in closed if name.startswith("checkpoint-")]
    assert checkpoint_seqs[-1] == 50
    assert all(0 < b - a <= 10 for a, b in itertools.pairwise(checkpoint_seqs))
    assert set(segments) <= set(closed)
    # Each closed segment is handed over before the checkpoint that says the log moved on.
    ends = [int(name[8:20]) - 1 for name in segments[1:]] + [50]
    for segment, last_seq in zip(segments, ends, strict=True):
        assert closed.index(segment) < closed.index(f"checkpoint-{last_seq:012d}.json")
    report = verify_dir(tmp_path, keys[1])
    assert report.ok, report.problems
    assert report.records == 50


async def test_restart_continues_the_same_chain(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A new writer on the same directory links its first record to the last one on disk."""
    for round_ in range(3):
        log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], write_timeout=5)
        await log.start()
        for n in range(5):
            await log.append(issued(round_ * 10 + n))
        await log.aclose()
    records = [
        json.loads(line)
        for path in sorted(tmp_path.glob("segment-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert [r["seq"] for r in records] == list(range(1, 16))
    assert verify_dir(tmp_path, keys[1]).ok


async def test_restart_drops_a_torn_last_line(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial line; start-up drops it and the chain goes on."""
    log = AuditLog(tmp_path, log_id="b", write_timeout=5)
    await log.start()
    await log.append(issued(1))
    await log.aclose()
    segment = next(tmp_path.glob("segment-*.jsonl"))
    with segment.open("ab") as file:
        file.write(b'{"event":"issued","req')
    log = AuditLog(tmp_path, log_id="b", write_timeout=5)
    await log.start()
    record = await log.append(issued(2))
    await log.aclose()
    assert record["seq"] == 2
    assert verify_dir(tmp_path, None, allow_unanchored=True).ok


async def test_refuses_to_start_behind_its_checkpoint(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """If records past the newest checkpoint vanished, the writer will not fork the chain."""
    log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], write_timeout=5)
    await log.start()
    for n in range(3):
        await log.append(issued(n))
    await log.aclose()
    segment = next(tmp_path.glob("segment-*.jsonl"))
    segment.write_bytes(segment.read_bytes().split(b"\n", 1)[0] + b"\n")
    log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], write_timeout=5)
    with pytest.raises(AuditUnavailable, match="checkpoint covers seq 3"):
        await log.start()
    await log.aclose()


@pytest.mark.serial  # asserts a failure within 1 s
async def test_unwritable_segment_fails_closed_then_recovers(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """When the next segment cannot be created, append raises fast; once fixed, it resumes."""
    log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], segment_max_bytes=1, write_timeout=1)
    await log.start()
    await log.append(issued(1))
    blocker = tmp_path / segment_name(2)
    blocker.mkdir()  # root ignores chmod, but nobody can open a directory for writing
    started = time.monotonic()
    with pytest.raises(AuditUnavailable, match="audit write failed"):
        await log.append(issued(2))
    assert time.monotonic() - started < 1.0
    blocker.rmdir()
    record = await log.append(issued(3))
    await log.aclose()
    assert record["seq"] == 2
    assert log.stats()["failures"] == 1
    report = verify_dir(tmp_path, keys[1])
    assert (report.ok, report.records) == (True, 2), report.problems


@pytest.mark.serial  # asserts failures within 1 s
async def test_stalled_disk_times_out_then_recovers(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """A write stuck past write_timeout raises; later appends fail fast until the disk returns."""
    log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], write_timeout=0.3)
    await log.start()
    await log.append(issued(1))
    stall = hang_audit_disk(log)  # the disk thread is busy with a write that hangs
    try:
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="longer than"):
            await log.append(issued(2))
        with pytest.raises(AuditUnavailable, match="still stalled"):
            await log.append(issued(3))
        assert time.monotonic() - started < 1.0
    finally:
        stall.set()
    await asyncio.sleep(0.05)
    record = await log.append(issued(4))
    await log.aclose()
    assert record["seq"] == 3  # the timed-out write of record 2 landed once the disk returned
    report = verify_dir(tmp_path, keys[1])
    assert (report.ok, report.records) == (True, 3), report.problems


async def test_write_that_landed_after_timeout_is_kept_in_the_chain(tmp_path: Path) -> None:
    """A record reported as failed but found on disk is kept, and the chain continues after it."""
    log = AuditLog(tmp_path, log_id="b", write_timeout=0.3)
    await log.start()
    await log.append(issued(1))
    stall = hang_audit_disk(log)  # the disk thread is busy with a write that hangs
    with pytest.raises(AuditUnavailable):
        await log.append(issued(2))
    stall.set()  # the disk comes back and the queued write lands after all
    await asyncio.sleep(0.05)
    after = await log.append(issued(3))
    await log.aclose()
    records = [json.loads(line) for line in (tmp_path / segment_name(1)).read_text().splitlines()]
    assert [r["request_id"] for r in records] == ["req-1", "req-2", "req-3"]
    assert (after["seq"], after["prev"]) == (3, records[1]["hash"])
    report = verify_dir(tmp_path, None, allow_unanchored=True)
    assert (report.ok, report.records) == (True, 3), report.problems


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root, as in CI), unmounted afterwards."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        cannot_run("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        cannot_run(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_full_disk_fails_closed_and_recovers_when_space_returns(tiny_tmpfs: Path) -> None:
    """On a really full filesystem append raises; after space is freed the chain goes on intact."""
    log = AuditLog(tiny_tmpfs / "log", log_id="b", write_timeout=2)
    await log.start()
    await log.append(issued(0))
    filler = tiny_tmpfs / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):
        file.write(b"\0" * (1 << 20))  # takes every free block
    written = 1
    with pytest.raises(AuditUnavailable, match="audit write failed"):
        for n in range(1, 200):  # the segment's last page still has room for a few records
            await log.append(issued(n))
            written += 1
    filler.unlink()
    record = await log.append(issued(999))
    await log.aclose()
    assert record["seq"] == written + 1
    report = verify_dir(tiny_tmpfs / "log", None, allow_unanchored=True)
    assert (report.ok, report.records) == (True, written + 1), report.problems


# ---- group commit ------------------------------------------------------------------------


def read_records(directory: Path) -> list[dict[str, object]]:
    """Every record on disk, in file order (segments in chain order)."""
    return [
        json.loads(line)
        for _, path in sorted_segments(directory)
        for line in path.read_bytes().splitlines()
    ]


async def test_concurrent_appends_share_fsyncs_and_chain_in_arrival_order(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """2,000 concurrent appends verify, in consecutive seqs by arrival, with few fsyncs."""
    closed: list[str] = []
    log = AuditLog(
        tmp_path,
        log_id="b",
        signing_key=keys[0],
        segment_max_bytes=100_000,
        checkpoint_every_records=100,
        write_timeout=10,
        on_segment_closed=lambda path: closed.append(path.name),
    )
    await log.start()
    results = await asyncio.gather(*(log.append(issued(n)) for n in range(2000)))
    stats = log.stats()
    await log.aclose()

    assert [r["seq"] for r in results] == list(range(1, 2001))  # arrival order is chain order
    on_disk = read_records(tmp_path)
    assert [r["seq"] for r in on_disk] == list(range(1, 2001))
    assert on_disk == results  # each caller got exactly the record stored for it
    assert (stats["records"], stats["failures"]) == (2000, 0)
    assert 0 < stats["batches"] <= 100  # one fsync per batch, not per record
    assert stats["largest_batch"] > 1
    report = verify_dir(tmp_path, keys[1])
    assert (report.ok, report.records, report.signed) == (True, 2000, True), report.problems
    # Rotation and checkpoints fall between batches exactly where single writes put them.
    segments = [path for _, path in sorted_segments(tmp_path)]
    assert len(segments) > 3
    assert all(path.stat().st_size < 100_000 + 1000 for path in segments)
    assert all(path.stat().st_size >= 100_000 for path in segments[:-1])
    checkpoint_seqs = [int(name[11:23]) for name in closed if name.startswith("checkpoint-")]
    assert checkpoint_seqs[-1] == 2000
    assert all(0 < b - a <= 100 for a, b in itertools.pairwise(checkpoint_seqs))


@pytest.mark.serial  # asserts failures within 1 s
async def test_stalled_batch_fails_every_caller_then_its_records_are_kept(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Every caller of a batch stuck past write_timeout gets AuditUnavailable within a second;
    when the disk returns, the batch that landed late stays in the chain and the log verifies."""
    log = AuditLog(tmp_path, log_id="b", signing_key=keys[0], write_timeout=0.3)
    await log.start()
    await log.append(issued(0))
    stall = hang_audit_disk(log)  # the disk thread is busy with a write that hangs

    async def timed_append(n: int) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await log.append(issued(n))
        except AuditUnavailable as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    try:
        outcomes = await asyncio.gather(*(timed_append(n) for n in range(1, 301)))
        later = await asyncio.gather(*(timed_append(n) for n in range(301, 351)))
    finally:
        stall.set()
    assert all(isinstance(exc, AuditUnavailable) for _, exc in outcomes + later)
    assert max(elapsed for elapsed, _ in outcomes + later) < 1.0
    assert {str(exc) for _, exc in outcomes} == {"audit write took longer than 0.3s"}
    assert {str(exc) for _, exc in later} == {"an earlier audit write is still stalled"}

    await asyncio.sleep(0.1)
    after = await log.append(issued(999))
    await log.aclose()
    on_disk = read_records(tmp_path)
    assert after["seq"] == 302  # the 300 refused records landed late and were kept
    assert [r["seq"] for r in on_disk] == list(range(1, 303))
    assert [r["request_id"] for r in on_disk[1:301]] == [f"req-{n}" for n in range(1, 301)]
    report = verify_dir(tmp_path, keys[1])
    assert (report.ok, report.records) == (True, 302), report.problems


async def test_cancelled_caller_still_queued_is_not_written(tmp_path: Path) -> None:
    """An append cancelled before its batch is formed leaves no record and no gap in seqs."""
    log = AuditLog(tmp_path, log_id="b", write_timeout=5)
    await log.start()
    tasks = [asyncio.create_task(log.append(issued(n))) for n in range(10)]
    await asyncio.sleep(0)  # every task has queued its record; the committer has not run yet
    tasks[4].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    await log.aclose()
    assert isinstance(done[4], asyncio.CancelledError)
    on_disk = read_records(tmp_path)
    assert [r["request_id"] for r in on_disk] == [f"req-{n}" for n in range(10) if n != 4]
    assert [r["seq"] for r in on_disk] == list(range(1, 10))
    assert verify_dir(tmp_path, None, allow_unanchored=True).ok


async def test_close_commits_queued_appends_and_refuses_new_ones(tmp_path: Path) -> None:
    """Appends queued when close starts are written; appends after it are refused."""
    log = AuditLog(tmp_path, log_id="b", write_timeout=5)
    await log.start()
    tasks = [asyncio.create_task(log.append(issued(n))) for n in range(50)]
    await asyncio.sleep(0)
    await log.aclose()
    assert [task.result()["seq"] for task in tasks] == list(range(1, 51))
    with pytest.raises(AuditUnavailable, match="not running"):
        await log.append(issued(99))
    report = verify_dir(tmp_path, None, allow_unanchored=True)
    assert (report.ok, report.records) == (True, 50), report.problems


async def test_partially_written_batch_is_cut_at_its_last_whole_record(tiny_tmpfs: Path) -> None:
    """A full disk tears a batch mid-way: all its callers fail, and recovery keeps the whole
    records that reached the disk, drops the torn one and continues the chain after them."""
    log = AuditLog(tiny_tmpfs / "log", log_id="b", write_timeout=2)
    await log.start()
    await log.append(issued(0))
    filler = tiny_tmpfs / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):
        file.write(b"\0" * (1 << 20))  # takes every free block; the segment's page has room left
    outcomes = await asyncio.gather(
        *(log.append(issued(n)) for n in range(1, 201)), return_exceptions=True
    )
    assert all(isinstance(outcome, AuditUnavailable) for outcome in outcomes)
    segment = tiny_tmpfs / "log" / segment_name(1)
    assert not segment.read_bytes().endswith(b"\n")  # the batch really was torn mid-record
    filler.unlink()
    after = await log.append(issued(999))
    await log.aclose()
    on_disk = read_records(tiny_tmpfs / "log")
    landed = len(on_disk) - 2
    assert 0 < landed < 200
    assert after["seq"] == landed + 2
    assert [r["seq"] for r in on_disk] == list(range(1, landed + 3))
    assert [r["request_id"] for r in on_disk[1:-1]] == [f"req-{n}" for n in range(1, landed + 1)]
    report = verify_dir(tiny_tmpfs / "log", None, allow_unanchored=True)
    assert (report.ok, report.records) == (True, landed + 2), report.problems


async def test_full_local_buffer_fails_closed_and_evicts_nothing(tmp_path: Path) -> None:
    """Past max_local_bytes every append is AuditUnavailable (503); every record stays."""
    log = AuditLog(tmp_path / "audit", log_id="t", max_local_bytes=2000, write_timeout=10)
    await log.start()
    written = 0
    with pytest.raises(AuditUnavailable, match="local audit buffer full"):
        for n in range(100):
            await log.append(issued(n))
            written += 1
    await log.aclose()
    assert 0 < written < 100
    assert verify_dir(tmp_path / "audit", None, allow_unanchored=True).ok
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "audit").glob("segment-*"))
    assert lines == written


async def test_a_shipped_file_kept_as_the_newest_is_pruned_once_a_newer_one_exists(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """A shipper that keeps up prunes each checkpoint while it is the newest: it stays then,
    and goes at the next prune, after a newer checkpoint exists."""
    written: asyncio.Queue[Path] = asyncio.Queue()  # what a shipper would upload, in order
    log = AuditLog(
        tmp_path,
        log_id="b",
        signing_key=keys[0],
        checkpoint_every_records=1,
        write_timeout=5,
        on_segment_closed=written.put_nowait,
    )
    await log.start()
    checkpoints = tmp_path / CHECKPOINT_DIR
    await log.append(issued(1))
    await log.prune(await written.get())
    assert sorted(p.name for p in checkpoints.iterdir()) == [checkpoint_name(1)]
    await log.append(issued(2))
    await log.prune(await written.get())
    assert sorted(p.name for p in checkpoints.iterdir()) == [checkpoint_name(2)]
    await log.aclose()
