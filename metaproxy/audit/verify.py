"""Verification: every record's bytes, hash, link and seq; every checkpoint's signature and head.

Checks are done in chain order by `ChainVerifier`, whose state is a few fields, so a check can
resume from any line (the tamper tests use that to try every byte of a log in seconds). A
problem is reported once where it happens and the check resynchronises after it, so one edited
record gives one problem, not a cascade.

Records after the newest checkpoint are either a live log's tail (the writer checkpoints every
`checkpoint_interval` seconds, so the oldest of them is younger than that, give or take the
slack) or a past nobody can vouch for: checkpoints deleted, the log rewritten. The first passes
with a note, the second fails. A checkpoint signed by a key that was not given is a key
mismatch, said once, not a missing checkpoint.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from metaproxy.audit import chain
from metaproxy.audit.checkpoint import (
    CHECKPOINT_EVERY_SECONDS,
    LIVE_TAIL_SLACK_SECONDS,
    Checkpoint,
)
from metaproxy.audit.checkpoint_keys import (
    KeyFiles,
    PublicKeys,
    key_mismatches,
    keys_by_id,
    load_public_keys,
    read_checkpoints,
)
from metaproxy.audit.names import (
    CHECKPOINT_DIR,
    CHECKPOINT_RE,
    LATEST_NAME,
    segment_first_seq,
    sorted_segments,
)
from metaproxy.audit.s3copy import download_s3


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    problems: list[str]
    first_bad: str
    signed: bool = False
    last_seq: int = 0
    head: str = chain.ZERO_HASH
    notes: list[str] = field(default_factory=list)
    # (file name, checkpoint) of every checkpoint file whose form and signature checked out:
    # fleet verification reads their witness statements.
    verified: list[tuple[str, Checkpoint]] = field(default_factory=list)


@dataclass
class ChainVerifier:
    """Consumes segments in order; `heads` keeps the hashes at the seqs checkpoints cover."""

    wanted_heads: frozenset[int] = frozenset()
    max_problems: int = 100
    next_seq: int = chain.FIRST_SEQ
    prev_hash: str | None = chain.ZERO_HASH  # None: unknown after an unreadable line
    records: int = 0
    heads: dict[int, tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    first_bad: str = ""
    time_of_seq: int = 0  # the record whose time `seq_time` keeps (the first unanchored one)
    seq_time: str = ""

    def resumable_copy(self) -> ChainVerifier:
        """The same position in the chain, with no problems recorded yet."""
        return ChainVerifier(
            self.wanted_heads,
            self.max_problems,
            self.next_seq,
            self.prev_hash,
            self.records,
            dict(self.heads),
        )

    @property
    def stopped(self) -> bool:
        return len(self.problems) >= self.max_problems

    def problem(self, where: str, what: str) -> None:
        if not self.first_bad:
            self.first_bad = where
        if not self.stopped:
            self.problems.append(f"{where}: {what}")

    def feed_segment(self, name: str, data: bytes, *, line: int = 1, offset: int = 0) -> None:
        """Check `data` (a whole segment file) from byte `offset`, which starts line `line`."""
        # An empty segment (a crash right after rotation) holds nothing to check; what it
        # might have held is caught by the seq gap or the checkpoints.
        promised = segment_first_seq(name)
        position = offset
        while position < len(data) and not self.stopped:
            newline = data.find(b"\n", position)
            end = len(data) if newline < 0 else newline
            self._check_line(name, line, data[position:end], newline >= 0, promised)
            position, line = end + 1, line + 1

    def _check_line(
        self, name: str, line: int, raw: bytes, terminated: bool, promised: int | None
    ) -> None:
        record = chain.parse_line(raw)
        seq = record.get("seq") if record is not None else None
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        where = f"{name} line {line} (seq {self.next_seq if seq is None else seq})"
        self.records += 1
        if record is None:
            self.problem(where, "not a record in canonical JSON (edited or corrupt)")
        elif not chain.self_consistent(record, raw):
            self.problem(where, "hash does not match the record's content (edited)")
        elif seq != self.next_seq:
            kind = (
                "gap: records missing"
                if seq is not None and seq > self.next_seq
                else ("duplicated or reordered record")
            )
            self.problem(where, f"seq {seq} where {self.next_seq} was expected ({kind})")
        elif self.prev_hash is not None and record["prev"] != self.prev_hash:
            self.problem(where, "prev does not link to the previous record (chain broken)")
        elif not terminated:
            self.problem(where, "last line has no newline (torn or appended to)")
        elif line == 1 and promised != seq:
            self.problem(where, f"segment name promises seq {promised} (segment renamed)")
        # Resynchronise on what the line claims, so one bad record is one problem.
        if record is not None and isinstance(record.get("hash"), str) and seq is not None:
            self.next_seq, self.prev_hash = seq + 1, str(record["hash"])
            if seq in self.wanted_heads:
                self.heads[seq] = (self.prev_hash, name)
            if seq == self.time_of_seq and isinstance(record.get("time"), str):
                self.seq_time = str(record["time"])
        else:
            self.next_seq, self.prev_hash = self.next_seq + 1, None


SegmentSource = tuple[str, Callable[[], bytes]]


def verify_log(
    segments: Iterable[SegmentSource],
    checkpoints: Iterable[tuple[str, bytes]],
    public_key: PublicKeys,
    *,
    anchor: bytes | None = None,
    unshipped_tail_ok: bool = False,
    allow_unanchored: bool = False,
    max_problems: int = 100,
    checkpoint_interval: float = CHECKPOINT_EVERY_SECONDS,
    now: datetime | None = None,
) -> VerifyReport:
    """Verify segments (in chain order) and checkpoint files, optionally against an anchor.

    `public_key`: one key, or every key the log was signed with across a rotation.

    `unshipped_tail_ok`: a copy shipped elsewhere holds closed segments only, so a checkpoint
    may name a segment that is still open; the copy must then end exactly before that segment.

    Every record must be covered by a checkpoint (or the anchor): a chain is only as good as
    the signed heads that pin it, and a log rewritten and re-chained after `checkpoints/` was
    deleted is otherwise perfectly consistent. Records after the last checkpoint pass, with a
    note, when the oldest of them was written less than `checkpoint_interval` plus
    `LIVE_TAIL_SLACK_SECONDS` before `now` (a live log's tail); `allow_unanchored` accepts them
    whatever their age (a log written without a key) and says so in `notes`.
    """
    keys = keys_by_id(public_key)
    notes: list[str] = []
    named = [(name, data) for name, data in checkpoints]
    if anchor is not None:
        named.append(("anchor", anchor))
    valid, problems, unknown_keys = read_checkpoints(named, keys)
    problems += key_mismatches(unknown_keys, keys)
    log_ids = {checkpoint.log_id for _, checkpoint in valid}
    if len(log_ids) > 1:
        problems.append(f"checkpoints belong to different logs: {sorted(log_ids)}")
    anchored = max((checkpoint.seq for _, checkpoint in valid), default=0)
    verifier = ChainVerifier(
        frozenset(cp.seq for _, cp in valid), max_problems, time_of_seq=anchored + 1
    )
    for name, load in segments:
        verifier.feed_segment(name, load())
    last_seq = verifier.next_seq - 1
    for name, checkpoint in valid:
        problems.extend(
            _checkpoint_problems(name, checkpoint, verifier, last_seq, unshipped_tail_ok)
        )
    unanchored = _unanchored(anchored, verifier.records, last_seq)
    if unanchored and unknown_keys and not valid:
        pass  # every checkpoint is there, signed by a key not given: said once, above
    elif unanchored and allow_unanchored:
        notes.append(f"unanchored: {unanchored}, accepted (--allow-unanchored)")
    elif unanchored:
        age = _age_seconds(verifier.seq_time, now or datetime.now(UTC))
        verdict = _tail_verdict(unanchored, age, checkpoint_interval)
        (notes if verdict.startswith("live tail") else problems).append(verdict)
    notes += _signing_notes(bool(keys), bool(valid), bool(named))
    all_problems = verifier.problems + problems
    return VerifyReport(
        ok=not all_problems,
        records=verifier.records,
        checkpoints=len(valid),
        problems=all_problems,
        first_bad=verifier.first_bad or (problems[0].split(":", 1)[0] if problems else ""),
        signed=bool(keys) and bool(valid),
        last_seq=last_seq,
        head=verifier.prev_hash or "",
        notes=notes,
        verified=[(name, checkpoint) for name, checkpoint in valid if name != "anchor"],
    )


def _tail_verdict(unanchored: str, age: float | None, interval: float) -> str:
    """A note ("live tail: ...") when the oldest unanchored record is younger than a
    checkpoint would be due, else the problem."""
    limit = interval + LIVE_TAIL_SLACK_SECONDS
    allowance = f"the checkpoint interval ({interval:g} s + {LIVE_TAIL_SLACK_SECONDS:g} s)"
    if age is not None and -LIVE_TAIL_SLACK_SECONDS < age < limit:
        return (
            f"live tail: {unanchored} yet, the oldest written {age:.0f} s ago, within {allowance}"
        )
    written = "at an unknown time" if age is None else f"{age:.0f} s before now"
    return (
        f"{unanchored}, the oldest written {written}, longer than {allowance}: checkpoints "
        "deleted, or the log rewritten; --allow-unanchored accepts it (a log written without "
        "a key)"
    )


def _age_seconds(time: str, now: datetime) -> float | None:
    try:
        written = datetime.fromisoformat(time)
    except ValueError:
        return None
    if written.tzinfo is None:
        written = written.replace(tzinfo=UTC)
    return (now - written).total_seconds()


def _signing_notes(keyed: bool, any_valid: bool, any_checkpoint: bool) -> list[str]:
    if not keyed:
        if any_valid:
            return ["unsigned: checkpoint signatures not checked (no public key given)"]
        return ["unsigned: no checkpoints, chain only"]
    return [] if any_checkpoint else ["unsigned: no checkpoints found"]


def _unanchored(anchored: int, records: int, last_seq: int) -> str:
    """The records no checkpoint covers, described, or "" when every one is covered."""
    if not records or last_seq <= anchored:
        return ""
    span = f"seq {anchored + 1}..{last_seq}" if anchored + 1 < last_seq else f"seq {last_seq}"
    return f"{span}: covered by no checkpoint"


def _checkpoint_problems(
    name: str, checkpoint: Checkpoint, verifier: ChainVerifier, last_seq: int, tail_ok: bool
) -> list[str]:
    """A checkpoint's `segment` is where the log continues after its seq: the segment holding
    that seq while it is open, or the next one when written at rotation, close or restart."""
    continues_at = segment_first_seq(checkpoint.segment) or 0
    recorded = verifier.heads.get(checkpoint.seq)
    if recorded is not None:
        head, segment = recorded
        if head != checkpoint.head:
            return [f"{name}: head at seq {checkpoint.seq} differs from the log (log rewritten)"]
        if segment != checkpoint.segment and continues_at != checkpoint.seq + 1:
            return [f"{name}: seq {checkpoint.seq} is in {segment}, not {checkpoint.segment}"]
        return []
    if checkpoint.seq <= last_seq:
        return []  # that record is unreadable and already reported
    if tail_ok and last_seq == continues_at - 1:
        # The writer still had that segment open: a shipped copy must end right before it.
        return []
    return [
        f"{name}: log ends at seq {last_seq} but this checkpoint covers seq {checkpoint.seq} "
        "(records deleted from the tail)"
    ]


def verify_dir(
    path: Path,
    public_key: KeyFiles,
    *,
    anchor: Path | None = None,
    unshipped_tail_ok: bool = False,
    allow_unanchored: bool = False,
    checkpoint_interval: float = CHECKPOINT_EVERY_SECONDS,
    now: datetime | None = None,
) -> VerifyReport:
    """Verify a log directory as the writer (or `verify_s3`'s download) lays it out."""
    key = load_public_keys(public_key)
    segments: list[SegmentSource] = [
        (entry.name, entry.read_bytes) for _, entry in sorted_segments(path)
    ]
    checkpoint_dir = path / CHECKPOINT_DIR
    checkpoint_files = (
        sorted(p for p in checkpoint_dir.iterdir() if CHECKPOINT_RE.match(p.name))
        if checkpoint_dir.is_dir()
        else []
    )
    checkpoints = [(p.name, p.read_bytes()) for p in checkpoint_files]
    latest = path / LATEST_NAME
    if latest.is_file():
        checkpoints.append((LATEST_NAME, latest.read_bytes()))
    return verify_log(
        segments,
        checkpoints,
        key,
        anchor=anchor.read_bytes() if anchor is not None else None,
        unshipped_tail_ok=unshipped_tail_ok,
        allow_unanchored=allow_unanchored,
        checkpoint_interval=checkpoint_interval,
        now=now,
    )


def verify_s3(
    url: str,
    public_key: KeyFiles,
    client_factory: Callable[[], Any],
    *,
    anchor: Path | None = None,
    allow_unanchored: bool = False,
) -> VerifyReport:
    """Download an s3:// copy and verify it; its latest-checkpoint.json is the anchor too."""
    with tempfile.TemporaryDirectory(prefix="metaproxy-audit-") as tmp:
        copied = download_s3(url, client_factory, Path(tmp))
        report = verify_dir(
            Path(tmp),
            public_key,
            anchor=anchor,
            unshipped_tail_ok=True,
            allow_unanchored=allow_unanchored,
        )
    if copied == 0:
        report.ok = False
        report.problems.append(f"{url}: no audit objects found")
    return report
