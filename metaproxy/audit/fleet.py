"""Fleet verification: every replica's chain, then every witness statement between them.

One chain's checks cannot see the chain vanish: delete a replica's whole folder from the copy,
or its last segment together with its newest checkpoints, and what is left of it (nothing, or
a shorter chain) verifies. The other replicas' checkpoints name its checkpoints by seq and file
digest, so the copy must still hold each witnessed checkpoint byte for byte, and the replica's
own verification then proves its records reach it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from metaproxy.audit.checkpoint import (
    CHECKPOINT_EVERY_SECONDS,
    Checkpoint,
    file_digest,
    parse_checkpoint,
)
from metaproxy.audit.checkpoint_keys import KeyFiles
from metaproxy.audit.layout import chain_dirs
from metaproxy.audit.names import CHECKPOINT_DIR, CHECKPOINT_RE, checkpoint_name
from metaproxy.audit.s3copy import download_s3
from metaproxy.audit.verify import VerifyReport, verify_dir


@dataclass
class ReplicaReport:
    """One replica's chain: its folder name, the log_id its checkpoints carry, its report."""

    name: str
    log_id: str
    report: VerifyReport
    digests: dict[int, str]  # checkpoint seq -> SHA-256 of that checkpoint file in the copy


@dataclass
class FleetReport:
    ok: bool
    replicas: list[ReplicaReport]
    problems: list[str]
    first_bad: str
    witnessed: int = 0  # distinct witness statements checked
    notes: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(replica.report.records for replica in self.replicas)

    @property
    def checkpoints(self) -> int:
        return sum(replica.report.checkpoints for replica in self.replicas)

    @property
    def signed(self) -> bool:
        return bool(self.replicas) and all(replica.report.signed for replica in self.replicas)


@dataclass(frozen=True, slots=True)
class _Statement:
    """`by` witnessed `log_id`'s checkpoint `seq` (file `digest`) at its own checkpoint `at`."""

    log_id: str
    seq: int
    digest: str
    by: str
    at: int


def verify_fleet_dir(
    path: Path,
    public_key: KeyFiles,
    *,
    anchor: Path | None = None,
    unshipped_tail_ok: bool = False,
    allow_unanchored: bool = False,
    checkpoint_interval: float = CHECKPOINT_EVERY_SECONDS,
    now: datetime | None = None,
) -> FleetReport:
    """Verify each `<instance>/` chain under `path`, then the witness statements between them.

    `anchor`, a checkpoint kept outside the copy, is checked against the chain of its log_id;
    `checkpoint_interval` and `now` tell each chain's live tail from an unanchored past.
    """
    anchor_log = parse_checkpoint(anchor.read_bytes()).log_id if anchor is not None else None
    replicas: list[ReplicaReport] = []
    for directory in chain_dirs(path):
        log_id = _log_id(directory)
        report = verify_dir(
            directory,
            public_key,
            anchor=anchor if log_id == anchor_log else None,
            unshipped_tail_ok=unshipped_tail_ok,
            allow_unanchored=allow_unanchored,
            checkpoint_interval=checkpoint_interval,
            now=now,
        )
        replicas.append(ReplicaReport(directory.name, log_id, report, _digests(directory)))
    problems: list[str] = []
    first_bad = ""
    for replica in replicas:
        problems += [f"{replica.name}/{problem}" for problem in replica.report.problems]
        if replica.report.first_bad and not first_bad:
            first_bad = f"{replica.name}/{replica.report.first_bad}"
    by_log_id: dict[str, ReplicaReport] = {}
    for replica in replicas:
        if replica.log_id in by_log_id:
            problems.append(
                f"replica {replica.log_id}: two chains in the copy "
                f"({by_log_id[replica.log_id].name}, {replica.name})"
            )
        by_log_id.setdefault(replica.log_id, replica)
    if anchor_log is not None and anchor_log not in by_log_id:
        problems.append(f"replica {anchor_log}: chain missing from the copy (the anchor's log)")
    statements = _statements(replicas)
    witness_problems = _witness_problems(statements, by_log_id)
    problems += witness_problems
    if not first_bad and problems:
        first_bad = problems[0].split(":", 1)[0]
    notes = [f"{replica.name}: {note}" for replica in replicas for note in replica.report.notes]
    if not replicas:
        problems.append(f"{path}: no replica chains found")
    return FleetReport(
        ok=not problems,
        replicas=replicas,
        problems=problems,
        first_bad=first_bad,
        witnessed=len(statements),
        notes=notes,
    )


def verify_fleet_s3(
    url: str,
    public_key: KeyFiles,
    client_factory: Callable[[], Any],
    *,
    anchor: Path | None = None,
    allow_unanchored: bool = False,
) -> FleetReport:
    """Download a fleet's copy (`prefix/<instance>/...`) and verify it as `verify_s3` does."""
    with tempfile.TemporaryDirectory(prefix="metaproxy-audit-") as tmp:
        download_s3(url, client_factory, Path(tmp))
        return verify_fleet_dir(
            Path(tmp),
            public_key,
            anchor=anchor,
            unshipped_tail_ok=True,
            allow_unanchored=allow_unanchored,
        )


def _log_id(directory: Path) -> str:
    """The log_id the chain's newest readable checkpoint names; else the folder's name."""
    checkpoint_dir = directory / CHECKPOINT_DIR
    if checkpoint_dir.is_dir():
        for entry in sorted(checkpoint_dir.iterdir(), reverse=True):
            if CHECKPOINT_RE.match(entry.name):
                try:
                    return parse_checkpoint(entry.read_bytes()).log_id
                except ValueError:
                    continue  # reported by the chain's own verification
    return directory.name


def _digests(directory: Path) -> dict[int, str]:
    checkpoint_dir = directory / CHECKPOINT_DIR
    if not checkpoint_dir.is_dir():
        return {}
    digests: dict[int, str] = {}
    for entry in checkpoint_dir.iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_file():
            digests[int(match.group(1))] = file_digest(entry.read_bytes())
    return digests


def _statements(replicas: list[ReplicaReport]) -> list[_Statement]:
    """Every distinct witness statement in a verified checkpoint (latest-checkpoint.json
    repeats one of the numbered files, so the set drops it)."""
    found: set[_Statement] = set()
    for replica in replicas:
        for _, checkpoint in replica.report.verified:
            found.update(_witnessed_by(checkpoint))
    return sorted(found, key=lambda s: (s.log_id, s.seq, s.by, s.at, s.digest))


def _witnessed_by(checkpoint: Checkpoint) -> list[_Statement]:
    return [
        _Statement(log_id, entry.seq, entry.digest, checkpoint.log_id, checkpoint.seq)
        for log_id, entry in checkpoint.witness.items()
    ]


def _witness_problems(
    statements: list[_Statement], by_log_id: dict[str, ReplicaReport]
) -> list[str]:
    """One problem per witnessed replica and seq, citing the latest witness of it."""
    problems: dict[tuple[str, int], str] = {}
    missing: dict[str, _Statement] = {}
    for statement in statements:
        target = by_log_id.get(statement.log_id)
        if target is None:
            # The newest statement is the one that shows how long the replica ran.
            best = missing.get(statement.log_id)
            if best is None or (statement.seq, statement.at) > (best.seq, best.at):
                missing[statement.log_id] = statement
            continue
        problem = _checkpoint_problem(statement, target)
        if problem is not None:
            problems[(statement.log_id, statement.seq)] = problem
    chain_missing = [
        f"replica {log_id}: chain missing from the copy, witnessed by {s.by} at its "
        f"checkpoint seq {s.at} (up to seq {s.seq})"
        for log_id, s in sorted(missing.items())
    ]
    return chain_missing + [problems[key] for key in sorted(problems)]


def _checkpoint_problem(statement: _Statement, target: ReplicaReport) -> str | None:
    witnessed = f"witnessed by {statement.by} at its checkpoint seq {statement.at}"
    digest = target.digests.get(statement.seq)
    if digest is None:
        return (
            f"replica {statement.log_id}: {checkpoint_name(statement.seq)} missing from the "
            f"copy (the copy ends at seq {target.report.last_seq}), {witnessed}"
        )
    if digest != statement.digest:
        return (
            f"replica {statement.log_id}: {checkpoint_name(statement.seq)} differs from the "
            f"one {witnessed} (rewritten)"
        )
    # The file is the witnessed one, so the replica's own verification has checked that its
    # records reach that seq (or, in a shipped copy, that only the open segment is missing).
    return None
