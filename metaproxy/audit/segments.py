"""Segment files: the audit chain on disk, one `segment-<first seq>.jsonl` at a time.

`SegmentFiles` keeps the one segment open for appends: it opens it under its first record's seq,
says when it is due to rotate (by size or age), appends a batch's bytes with one write and one
fsync, re-reads its tail after a write whose fate is unknown, and seals it. Every file
operation runs on the log's `DiskWorker`; the functions below the class are those jobs.

A new file's name is fsynced into its directory before a record goes in it; a torn last line
(a crash mid-write, never acknowledged to anyone) is cut off; an empty segment is never left
behind, so every file on disk holds at least one record its name promises.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from metaproxy.audit.chain import parse_line, self_consistent
from metaproxy.audit.disk import DiskWorker
from metaproxy.audit.names import segment_name
from metaproxy.clock import Clock
from metaproxy.errors import AuditUnavailable
from metaproxy.fsutil import fsync_dir

_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
TAIL_BYTES: Final = 1 << 20  # far above the largest record (fields are capped at 2 KiB)


@dataclass(slots=True)
class Segment:
    path: Path
    first_seq: int
    fd: int | None
    size: int
    opened_at: float  # monotonic


class SegmentFiles:
    """The segment open for appends in `directory`, rotated at `max_bytes` or `max_seconds`."""

    def __init__(
        self,
        directory: Path,
        disk: DiskWorker,
        clock: Clock,
        *,
        max_bytes: int,
        max_seconds: float,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._disk = disk
        self._clock = clock
        self.current: Segment | None = None

    def room(self) -> int:
        """Bytes the open segment takes before it is full (a batch may end past it by a record)."""
        return self.max_bytes - (self.current.size if self.current is not None else 0)

    def due(self) -> bool:
        """The open segment is full or old: the next batch goes to a new one."""
        segment = self.current
        return segment is not None and (
            segment.size >= self.max_bytes
            or self._clock.monotonic() - segment.opened_at >= self.max_seconds
        )

    def aged(self) -> bool:
        """The open segment holds records and has reached its age: ship it even while idle."""
        segment = self.current
        return (
            segment is not None
            and segment.size > 0
            and self._clock.monotonic() - segment.opened_at >= self.max_seconds
        )

    async def open(self, first_seq: int, deadline: float) -> Segment:
        """The open segment, or a new one named after `first_seq`."""
        if self.current is not None:
            return self.current
        path = self.directory / segment_name(first_seq)
        # Abandoned (deadline passed), the open still completes later: its fd must not leak.
        fd, size = await self._disk.run(
            open_segment, path, deadline=deadline, on_abandoned=lambda opened: _close(opened[0])
        )
        self.current = Segment(path, first_seq, fd, size, self._clock.monotonic())
        return self.current

    async def append(self, data: bytes, deadline: float) -> None:
        """Write `data` at the end of the open segment and fsync it."""
        segment = self.current
        if segment is None or segment.fd is None:
            raise AuditUnavailable("audit segment is not open")
        await self._disk.run(write_all, segment.fd, data, deadline=deadline)
        segment.size += len(data)

    async def reread(self, deadline: float) -> dict[str, object] | None:
        """After a failed write: reopen the segment, cut a torn last line, and return its last
        whole record (None when it holds none)."""
        segment = self.current
        assert segment is not None
        self._disk.ensure_free()  # refused before the job: the old fd stays ours
        old_fd, segment.fd = segment.fd, None  # the job closes it, whenever it runs
        last, fd, size = await self._disk.run(
            reopen_at_tail,
            segment.path,
            old_fd,
            segment.first_seq,
            deadline=deadline,
            on_abandoned=lambda reopened: _close(reopened[1]),
        )
        segment.fd, segment.size = fd, size
        return last

    async def seal(self, deadline: float | None = None) -> Path | None:
        """Close the open segment for good: the file, or None if it was never written (and so
        is gone)."""
        segment, self.current = self.current, None
        if segment is None:
            return None
        with contextlib.suppress(AuditUnavailable):
            if segment.fd is not None:
                await self._disk.run(os.close, segment.fd, deadline=deadline)
            if segment.size == 0:  # opened but never written (the write failed): no empty files
                await self._disk.run(unlink_if_empty, segment.path, deadline=deadline)
        return segment.path if segment.size > 0 else None


# ---- jobs for the disk thread --------------------------------------------------------------


def open_segment(path: Path) -> tuple[int, int]:
    """(fd, size) of `path`, opened for appends (created if new, its name made durable)."""
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        size = os.fstat(fd).st_size
        fsync_dir(path.parent)  # the new name must survive a crash too
    except OSError:
        os.close(fd)
        raise
    return fd, size


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def reopen_at_tail(
    path: Path, old_fd: int | None, first_seq: int
) -> tuple[dict[str, object] | None, int, int]:
    """(last whole record, new fd, size): `old_fd` closed, a torn last line cut off."""
    if old_fd is not None:
        _close(old_fd)
    last, end, size = read_tail(path)
    if end != size:
        os.truncate(path, end)  # a partial line: the write that failed, never acknowledged
    if last is None and end != 0:
        raise AuditUnavailable(f"audit segment {path.name} has a corrupt last record")
    if last is not None and int(last["seq"]) < first_seq:  # type: ignore[call-overload]
        raise AuditUnavailable(f"audit segment {path.name} does not match its name")
    fd, size = open_segment(path)
    try:
        os.fsync(fd)
    except OSError:
        os.close(fd)
        raise
    return last, fd, size


def unlink_if_empty(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == 0:
            path.unlink()


def read_tail(path: Path) -> tuple[dict[str, object] | None, int, int]:
    """(last complete, valid record or None, offset just past it, file size); missing = empty."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = max(0, size - TAIL_BYTES)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return None, 0, 0
    cut = data.rfind(b"\n")
    if cut < 0:
        return None, 0, size
    end = start + cut + 1
    line_start = data.rfind(b"\n", 0, cut) + 1
    record = parse_line(data[line_start:cut])
    if record is None or not self_consistent(record):
        return None, end, size
    return record, end, size


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
