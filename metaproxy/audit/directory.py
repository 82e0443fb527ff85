"""A log's directory as a whole: where its chain ends when the writer starts, and taking out
the files the sink already holds (the local directory is a bounded buffer in front of it)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from metaproxy.audit.names import CHECKPOINT_DIR, sorted_segments
from metaproxy.audit.segments import read_tail
from metaproxy.errors import AuditUnavailable

log = logging.getLogger("metaproxy.audit")


class OnDisk(NamedTuple):
    """What a log directory holds at start-up."""

    last_record: dict[str, object] | None
    newest_segment: Path | None
    newest_checkpoint: int  # its seq; 0 for none
    local_bytes: int  # segments and checkpoints not yet pruned


def scan(directory: Path) -> OnDisk:
    """Create the directory, or find where its chain ends: the newest segment's last record
    (a torn last line dropped, a never-written newest segment removed) and the newest
    checkpoint's seq."""
    try:
        return _scan(directory)
    except OSError as exc:
        raise AuditUnavailable(f"cannot open audit directory: {exc.strerror}") from None


def _scan(directory: Path) -> OnDisk:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / CHECKPOINT_DIR).mkdir(mode=0o700, exist_ok=True)
    newest_checkpoint = 0
    local_bytes = 0
    for entry in (directory / CHECKPOINT_DIR).iterdir():
        if entry.name.startswith("checkpoint-") and entry.name.endswith(".json"):
            local_bytes += entry.stat().st_size
            with contextlib.suppress(ValueError):
                newest_checkpoint = max(newest_checkpoint, int(entry.name[11:23]))
    local_bytes += sum(path.stat().st_size for _, path in sorted_segments(directory))
    for first_seq, path in reversed(sorted_segments(directory)):
        last, end, size = read_tail(path)
        if end != size:
            # A torn final line was never acknowledged to anyone: drop it.
            log.warning("audit segment %s: dropping %d torn bytes", path.name, size - end)
            os.truncate(path, end)
        if last is None:
            if end == 0:
                path.unlink()  # created, never written: a crash right after rotation
                continue
            raise AuditUnavailable(f"audit segment {path.name} has a corrupt last record")
        if int(last["seq"]) < first_seq:  # type: ignore[call-overload]
            raise AuditUnavailable(f"audit segment {path.name} does not match its name")
        return OnDisk(last, path, newest_checkpoint, local_bytes)
    return OnDisk(None, None, newest_checkpoint, local_bytes)


def prune(directory: Path, paths: Iterable[Path]) -> tuple[int, list[Path]]:
    """Unlink each of `paths` (files the sink holds) unless it is the newest segment or the
    newest checkpoint: the bytes freed, and the paths kept for being the newest."""
    freed, kept = 0, []
    for path in paths:
        if _is_newest(directory, path):
            kept.append(path)
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed, kept


def _is_newest(directory: Path, path: Path) -> bool:
    if path.parent.name == CHECKPOINT_DIR:
        newest = max((p.name for p in path.parent.glob("checkpoint-*.json")), default="")
        return path.name >= newest
    segments = sorted_segments(directory)
    return not segments or path.name >= segments[-1][1].name
