"""Verification: any edit, deletion, reordering, duplication or truncation of the log is found."""

from __future__ import annotations

import asyncio
import bisect
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from metaproxy.audit import chain
from metaproxy.audit.names import segment_first_seq, segment_name, sorted_segments
from metaproxy.audit.record import make_record
from metaproxy.audit.signing_keys import load_public_key, write_keypair
from metaproxy.audit.verify import ChainVerifier, VerifyReport, verify_dir, verify_log
from metaproxy.audit.writer import AuditLog

RECORDS = 1000


def _an_hour_later() -> datetime:
    """When a check finds the log's unanchored records older than the checkpoint interval."""
    return datetime.now(UTC) + timedelta(hours=1)


Segments = list[tuple[str, bytes]]


async def _write_log(directory: Path, key: Path, records: int = RECORDS) -> None:
    """`records` records, in segments of a fifth of them and a checkpoint every tenth."""
    log = AuditLog(
        directory,
        log_id="broker-a",
        signing_key=key,
        segment_max_bytes=records * 100,
        checkpoint_every_records=records // 10,
        write_timeout=10,
    )
    await log.start()
    for n in range(records):
        await log.append(
            make_record(
                "issued",
                request_id=f"req-{n:04d}",
                task=f"task-{n % 50}",
                tenant="acme",
                role_arn="arn:aws:iam::123456789012:role/app",
                session_name=f"acme-task-{n % 50}",
                access_key_id=f"ASIA{n:016d}",
                expiration="2026-01-01T01:00:00Z",
                status=200,
            )
        )
    await log.aclose()


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1,000-record log in five segments with 13 checkpoints, and its public key."""
    base = tmp_path_factory.mktemp("audit")
    private, public = write_keypair(base / "keys")
    asyncio.run(_write_log(base / "log", private))
    return base / "log", public


@pytest.fixture(scope="module")
def small_audit_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same shape a quarter the size: 250 records in five segments, 13 checkpoints. For the
    test that flips every byte (the property is per byte; 400,000 flips were 6 s of CPU)."""
    base = tmp_path_factory.mktemp("small-audit")
    private, public = write_keypair(base / "keys")
    asyncio.run(_write_log(base / "log", private, records=RECORDS // 4))
    return base / "log", public


def _load(directory: Path) -> tuple[Segments, Segments]:
    segments = [(p.name, p.read_bytes()) for _, p in sorted_segments(directory)]
    checkpoints = [(p.name, p.read_bytes()) for p in sorted((directory / "checkpoints").iterdir())]
    return segments, checkpoints


def _verify(segments: Segments, checkpoints: Segments, public: Path, **kw: bytes) -> VerifyReport:
    """Pieces of a log: the tail past the checkpoints given is accepted unless asked."""
    ordered = sorted(segments, key=lambda item: segment_first_seq(item[0]) or 0)
    sources = [(name, lambda data=data: data) for name, data in ordered]
    kw.setdefault("allow_unanchored", True)  # type: ignore[arg-type]
    return verify_log(sources, checkpoints, load_public_key(public), **kw)  # type: ignore[arg-type]


@pytest.mark.serial  # asserts verification within 0.5 s
def test_untouched_log_verifies_in_milliseconds(audit_dir: tuple[Path, Path]) -> None:
    """The whole untouched log verifies, signatures included, well under a second."""
    directory, public = audit_dir
    started = time.perf_counter()
    report = verify_dir(directory, public)
    elapsed = time.perf_counter() - started
    assert report.problems == []
    assert (report.ok, report.records, report.checkpoints, report.signed) == (True, 1000, 13, True)
    assert len(list(directory.glob("segment-*.jsonl"))) == 5
    assert elapsed < 0.5


def test_every_single_byte_change_is_detected_at_its_record(
    small_audit_dir: tuple[Path, Path],
) -> None:
    """Flipping any byte of any segment fails verification and names that byte's line."""
    directory, _ = small_audit_dir
    assert len(list(directory.glob("segment-*.jsonl"))) == 5
    segments, _ = _load(directory)
    state = ChainVerifier(max_problems=1)
    checked = 0
    for name, data in segments:
        starts = [0, *[i + 1 for i, byte in enumerate(data) if byte == 0x0A][:-1]]
        # The verifier's state before each line: a check can resume there, so each flip costs
        # one or two lines instead of the whole log, through the very same code.
        before: list[ChainVerifier] = []
        for number, start in enumerate(starts, 1):
            before.append(state.resumable_copy())
            end = data.index(b"\n", start) + 1
            state.feed_segment(name, data[:end], line=number, offset=start)
        assert state.problems == []
        for offset in range(len(data)):
            number = bisect.bisect_right(starts, offset)
            start = starts[number - 1]
            window_end = data.find(b"\n", data.index(b"\n", offset) + 1) + 1 or len(data)
            window = bytearray(data[start:window_end])  # this line and the next
            window[offset - start] ^= 1 << (offset % 8)
            verifier = before[number - 1].resumable_copy()
            verifier.feed_segment(name, bytes(window), line=number)
            assert verifier.first_bad.startswith(f"{name} line {number} ("), (offset, verifier)
            checked += 1
    assert checked == sum(len(data) for _, data in segments) > 100_000


def test_every_checkpoint_byte_change_is_detected(audit_dir: tuple[Path, Path]) -> None:
    """Flipping any byte of a checkpoint file fails verification."""
    directory, public = audit_dir
    segments, checkpoints = _load(directory)
    first_segment = segments[:1]
    name, data = checkpoints[0]
    assert name == "checkpoint-000000000100.json"
    assert _verify(first_segment, [(name, data)], public).ok
    for offset in range(len(data)):
        mutated = bytearray(data)
        mutated[offset] ^= 1 << (offset % 8)
        report = _verify(first_segment, [(name, bytes(mutated))], public)
        assert not report.ok, offset
        assert report.first_bad == name


@pytest.mark.parametrize(
    ("operation", "first_bad", "message"),
    [
        ("delete", "segment-000000000001.jsonl line 17 (seq 18)", "gap"),
        ("swap", "segment-000000000001.jsonl line 17 (seq 18)", "gap"),
        ("duplicate", "segment-000000000001.jsonl line 18 (seq 17)", "duplicated or reordered"),
        ("delete_first", "segment-000000000001.jsonl line 1 (seq 2)", "gap"),
    ],
)
def test_deleting_reordering_or_duplicating_a_record_is_detected(
    audit_dir: tuple[Path, Path], operation: str, first_bad: str, message: str
) -> None:
    """A record removed, moved or repeated breaks the seq and the chain at that point."""
    directory, public = audit_dir
    segments, checkpoints = _load(directory)
    name, data = segments[0]
    lines = data.splitlines(keepends=True)
    if operation == "delete":
        del lines[16]
    elif operation == "swap":
        lines[16], lines[17] = lines[17], lines[16]
    elif operation == "duplicate":
        lines.insert(17, lines[16])
    else:
        del lines[0]
    segments[0] = (name, b"".join(lines))
    report = _verify(segments, checkpoints, public)
    assert not report.ok
    assert report.first_bad == first_bad
    assert message in report.problems[0]


def _rename(segment: tuple[str, bytes], first_seq: int) -> tuple[str, bytes]:
    return segment_name(first_seq), segment[1]


@pytest.mark.parametrize(
    "operation",
    ["delete_middle", "delete_first", "swap_contents", "duplicate", "rename", "delete_last"],
)
def test_segment_level_tampering_is_detected(audit_dir: tuple[Path, Path], operation: str) -> None:
    """Whole segments deleted, swapped, copied or renamed fail verification."""
    directory, public = audit_dir
    segments, checkpoints = _load(directory)
    if operation == "delete_middle":
        del segments[2]
    elif operation == "delete_first":
        del segments[0]
    elif operation == "swap_contents":
        segments[1], segments[2] = (
            (segments[1][0], segments[2][1]),
            (segments[2][0], segments[1][1]),
        )
    elif operation == "duplicate":
        segments.append(_rename(segments[1], 999))
    elif operation == "rename":
        segments[1] = _rename(segments[1], (segment_first_seq(segments[1][0]) or 0) + 1)
    else:
        del segments[-1]  # and its seq is covered by checkpoints that are still there
    report = _verify(segments, checkpoints, public)
    assert not report.ok, operation
    assert report.problems


def test_truncated_tail_is_detected_against_the_anchored_checkpoint(
    audit_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    """Cutting the last records and their checkpoints passes locally but not against the anchor."""
    directory, public = audit_dir
    copy = tmp_path / "log"
    shutil.copytree(directory, copy)
    anchor = tmp_path / "anchor.json"
    newest = sorted((copy / "checkpoints").iterdir())[-1]
    shutil.copy(newest, anchor)
    last_segment = sorted(copy.glob("segment-*.jsonl"))[-1]
    lines = last_segment.read_bytes().splitlines(keepends=True)
    last_segment.write_bytes(b"".join(lines[:-5]))
    assert not verify_dir(copy, public).ok  # the newest local checkpoint still names seq 1000
    newest.unlink()  # a careful attacker removes it too
    # The tail it left is covered by no checkpoint: a live tail right after it was written,
    # a failure once older than the checkpoint interval.
    assert not verify_dir(copy, public, now=_an_hour_later()).ok
    assert verify_dir(copy, public, allow_unanchored=True).ok
    report = verify_dir(copy, public, anchor=anchor)
    assert not report.ok
    assert "log ends at seq 995 but this checkpoint covers seq 1000" in report.problems[0]


def test_wrong_public_key_and_unsigned_logs_are_reported(
    audit_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    """Checkpoints signed by another key fail; verifying without a key says it is unsigned."""
    directory, _ = audit_dir
    _, other_public = write_keypair(tmp_path / "other")
    wrong = verify_dir(directory, other_public)
    assert not wrong.ok
    assert "signed by key" in wrong.problems[0]
    unsigned = verify_dir(directory, None)
    assert unsigned.ok
    assert not unsigned.signed
    assert unsigned.notes[0].startswith("unsigned")


def test_rechained_log_without_checkpoints_fails_unless_allowed(
    audit_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    """A log rewritten and re-chained after checkpoints/ was deleted fails verification;
    --allow-unanchored passes it and says so."""
    directory, public = audit_dir
    copy = tmp_path / "log"
    shutil.copytree(directory, copy)
    shutil.rmtree(copy / "checkpoints")
    head, seq = chain.ZERO_HASH, chain.FIRST_SEQ
    for _, segment in sorted_segments(copy):
        lines = []
        for raw in segment.read_bytes().splitlines():
            record = json.loads(raw)
            record["task"] = "someone-else"  # the rewrite
            for name in chain.WRITER_FIELDS:
                record.pop(name, None)
            record["seq"], record["prev"] = seq, head
            record["hash"] = head = chain.record_hash(head, record)
            lines.append(chain.record_line(record))
            seq += 1
        segment.write_bytes(b"".join(lines))
    report = verify_dir(copy, public, now=_an_hour_later())
    assert not report.ok
    assert "covered by no checkpoint" in report.problems[0]
    relaxed = verify_dir(copy, public, allow_unanchored=True, now=_an_hour_later())
    assert relaxed.ok
    assert any("unanchored" in note for note in relaxed.notes)
