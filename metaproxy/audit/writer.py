"""The audit writer: appends hash-chained records to segment files, fsynced, fail closed.

`AuditLog` composes four parts and owns the order between them: the chain head, a pure value
(`head.py`); the disk thread every file operation runs on (`disk.py`); the segment files, their
rotation and recovery (`segments.py`); and the signed checkpoints with their fleet witnesses
(`checkpointer.py`).

Group commit: appends that arrive while a write is in flight queue up, and the next batch
chains them in arrival order and stores them with one `os.write` and one `fsync`; each caller
gets its record back only once the fsync covering it succeeded. One fsync per record capped a
broker at ~260 records/s on a slow disk, with requests queueing seconds for the lock.

A batch that fails or outlasts `write_timeout` raises `AuditUnavailable` in every caller of the
batch (the broker then refuses to issue); any prefix of the batch may be on disk, so before the
next batch the writer re-reads the segment's tail and takes the chain head from what is really
there. Rotation and checkpoints happen only between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from metaproxy.audit import chain
from metaproxy.audit.checkpoint import CHECKPOINT_EVERY_SECONDS
from metaproxy.audit.checkpointer import Checkpointer
from metaproxy.audit.directory import prune, scan
from metaproxy.audit.disk import DiskWorker
from metaproxy.audit.head import Batch, ChainHead, link_batch
from metaproxy.audit.names import segment_name
from metaproxy.audit.segments import SegmentFiles
from metaproxy.audit.witness import (
    WITNESS_TIMEOUT,
    CheckpointListener,
    Witnessing,
    WitnessSource,
)
from metaproxy.clock import Clock, SystemClock
from metaproxy.errors import AuditUnavailable

log = logging.getLogger("metaproxy.audit")

# Bounds on one group commit: a batch holds the records of callers that all wait for it, and
# a megabyte is a few milliseconds of disk bandwidth, well inside any sane write_timeout.
MAX_BATCH_RECORDS: Final = 512
MAX_BATCH_BYTES: Final = 1 << 20


@dataclass(slots=True)
class _Waiter:
    """One queued append: its record so far and the future its caller awaits."""

    record: dict[str, object]
    future: asyncio.Future[dict[str, object]]


class AuditLog:
    def __init__(
        self,
        directory: Path,
        *,
        log_id: str,
        signing_key: Path | None = None,
        segment_max_bytes: int = 8 << 20,
        segment_max_seconds: float = 3600,
        checkpoint_every_records: int = 1000,
        checkpoint_every_seconds: float = CHECKPOINT_EVERY_SECONDS,
        write_timeout: float = 0.5,
        clock: Clock | None = None,
        on_segment_closed: Callable[[Path], None] | None = None,
        witness: WitnessSource | None = None,
        on_checkpoint: CheckpointListener | None = None,
        witness_timeout: float = WITNESS_TIMEOUT,
        max_local_bytes: int = 0,
    ) -> None:
        if not log_id:
            raise ValueError("audit log needs a log_id")
        self.directory = Path(directory)
        self.log_id = log_id
        self._clock: Clock = clock or SystemClock()
        self._write_timeout = write_timeout
        self._disk = DiskWorker(write_timeout=write_timeout, clock=self._clock)
        self._segments = SegmentFiles(
            self.directory,
            self._disk,
            self._clock,
            max_bytes=segment_max_bytes,
            max_seconds=segment_max_seconds,
        )
        # Where the other replicas' latest checkpoints come from, and where ours go once
        # durable; both capped at `witness_timeout`, and free to fail.
        witnessing = Witnessing(
            log_id, source=witness, on_checkpoint=on_checkpoint, timeout=witness_timeout
        )
        self._checkpoints = Checkpointer(
            self.directory,
            self._disk,
            witnessing,
            self._clock,
            log_id=log_id,
            signing_key=signing_key,
            every_records=checkpoint_every_records,
            every_seconds=checkpoint_every_seconds,
            write_timeout=write_timeout,
        )
        # The local directory is a buffer in front of the sink: bounded, and when full the
        # broker refuses to issue (503) rather than fill the volume and get evicted. 0: none.
        self._max_local_bytes = max_local_bytes
        self._local_bytes = 0
        self._shipped_newest: list[Path] = []  # in the sink, kept here as the newest of their kind
        # Called with every file that became immutable: closed segments and new checkpoints.
        self._on_closed = on_segment_closed
        self._head = ChainHead()
        # A batch whose write failed: the disk may hold any prefix of it until recovery reads.
        self._unsettled: Batch | None = None
        self._lock = asyncio.Lock()
        self._queue: deque[_Waiter] = deque()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._maintenance: asyncio.Task[None] | None = None
        self._records = 0
        self._refused = 0
        self._batches = 0
        self._largest_batch = 0
        self._last_write_seconds = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory or resume the chain after the newest record on disk."""
        self._closing = False
        await self._disk.start()
        on_disk = await self._disk.run(scan, self.directory)
        if on_disk.last_record is not None:
            self._head = ChainHead.after(on_disk.last_record)
        if on_disk.newest_checkpoint > self._head.seq:
            # Checkpoints are written only after their records are fsynced, so a checkpoint
            # past the head means records were lost or removed; extending would fork the chain.
            raise AuditUnavailable(
                f"audit log ends at seq {self._head.seq} but a checkpoint covers seq "
                f"{on_disk.newest_checkpoint}; investigate, or start a new log in a new directory"
            )
        self._local_bytes = on_disk.local_bytes
        self._checkpoints.start(on_disk.newest_checkpoint)
        if on_disk.newest_segment is not None:
            await self._checkpoints.refresh_witnesses()
            # A restart never appends to a file a crashed process may have been writing:
            # pin the old head in a checkpoint, hand the segment to the shipper, open anew.
            async with self._lock:
                checkpoint = await self._checkpoint(segment_name(self._head.next_seq))
            # The segment before the checkpoint naming its successor: a copy never holds that
            # checkpoint without the segment, which would read as a deleted tail.
            self._notify(on_disk.newest_segment)
            self._notify(checkpoint)
        self._maintenance = asyncio.create_task(self._maintain(), name="audit-maintenance")

    async def aclose(self) -> None:
        """Commit what is queued, write a final checkpoint, close the segment, stop the disk."""
        self._closing = True
        if self._committer is not None:
            # asyncio.wait, not await: a cancelled close must not cancel the callers' batch.
            await asyncio.wait({self._committer})
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._disk.running:
            # The final checkpoint is the one other replicas most need to have seen.
            await self._checkpoints.refresh_witnesses()
        async with self._lock:
            if not self._disk.running:
                return
            if self._healthy():
                with contextlib.suppress(AuditUnavailable):
                    await self._close_segment()
            await self._disk.aclose()
        # Published before we go, so replicas closing after us witness our final head.
        await self._checkpoints.aclose()

    async def prune(self, path: Path) -> None:
        """Remove the local copy of a file the sink now holds (`S3Shipper(on_uploaded=...)`).

        The newest segment and the newest checkpoint stay: a restart resumes the chain from
        them (with no segment left it would start a new chain at seq 1). A file kept for that
        is tried again at each later call, so it goes once a newer one exists (a shipper that
        keeps up with the writer uploads every file while it is still the newest)."""
        candidates, self._shipped_newest = [*self._shipped_newest, path], []
        # Not on the disk thread: the shipper keeps uploading (and pruning) after close.
        freed, kept = await asyncio.to_thread(prune, self.directory, candidates)
        self._shipped_newest.extend(kept)
        self._local_bytes = max(0, self._local_bytes - freed)

    def stats(self) -> dict[str, float]:
        """Counters; `batches` is the number of record fsyncs (one per group commit)."""
        return {
            "local_bytes": float(self._local_bytes),
            "records": float(self._records),
            "failures": float(self._disk.failures + self._refused),
            "checkpoints": float(self._checkpoints.written),
            "batches": float(self._batches),
            "largest_batch": float(self._largest_batch),
            "last_write_seconds": self._last_write_seconds,
            "seq": float(self._head.seq),
        }

    # ---- appending -------------------------------------------------------------------------

    async def append(self, record: Mapping[str, object]) -> dict[str, object]:
        """Chain, write and fsync one record; raise AuditUnavailable if that cannot be done."""
        body = _checked_body(record)
        if not self._disk.running or self._closing:
            raise AuditUnavailable("audit log is not running")
        if self._max_local_bytes and self._local_bytes >= self._max_local_bytes:
            # Fail closed, never evict: what is here has not reached the sink yet.
            self._refused += 1
            raise AuditUnavailable(
                f"local audit buffer full ({self._local_bytes} bytes not yet shipped and pruned)"
            )
        future: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter({"time": chain.iso_millis(self._clock.now()), **body}, future))
        # Registered before any await, so concurrent callers all join the one committer.
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="audit-commit")
        # A cancelled caller cancels only its own future: still queued, its record is skipped;
        # already in a batch, the record is written anyway (over-reporting is the safe side).
        return await future

    async def _commit_queued(self) -> None:
        """Commit batches until the queue is empty; releasing the lock between batches lets
        maintenance rotate and checkpoint in between."""
        try:
            while self._queue:
                async with self._lock:
                    await self._commit_batch()
        except asyncio.CancelledError:
            _fail(list(self._queue), "audit log is shutting down")
            self._queue.clear()
            raise

    async def _commit_batch(self) -> None:
        taken = self._take_waiters()
        if not taken:
            return
        waiting: list[_Waiter] = taken
        started = self._clock.monotonic()
        deadline = started + self._write_timeout
        try:
            if not self._disk.running:
                raise AuditUnavailable("audit log is not running")
            await self._ready_segment(deadline)
            batch = link_batch(
                self._head,
                [waiter.record for waiter in taken],
                max_bytes=min(MAX_BATCH_BYTES, self._segments.room()),
                last_seq=self._checkpoints.batch_limit(self._head),
            )
            waiting = taken[: len(batch.records)]
            self._queue.extendleft(reversed(taken[len(waiting) :]))
            # Until the write is confirmed its fate is unknown: recovery reads the tail.
            self._unsettled = batch
            await self._segments.append(batch.data, deadline)
        except AuditUnavailable as exc:
            _fail(waiting, exc.detail)
            return
        except asyncio.CancelledError:
            _fail(waiting, "audit log is shutting down")
            raise
        except Exception:
            log.exception("audit batch failed unexpectedly")
            _fail(waiting, "audit write failed: internal error")
            return
        self._unsettled = None
        self._last_write_seconds = self._clock.monotonic() - started
        self._head = batch.end
        self._local_bytes += len(batch.data)
        self._records += len(batch.records)
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(batch.records))
        for waiter, stored in zip(waiting, batch.records, strict=True):
            if not waiter.future.done():
                waiter.future.set_result(stored)
        if self._checkpoints.due_by_records(self._head) and self._segments.current is not None:
            self._notify(await self._checkpoint(self._segments.current.path.name))

    def _take_waiters(self) -> list[_Waiter]:
        """Up to a batch of queued appends whose callers still wait, in arrival order."""
        taken: list[_Waiter] = []
        while self._queue and len(taken) < MAX_BATCH_RECORDS:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                taken.append(waiter)
        return taken

    async def _ready_segment(self, deadline: float) -> None:
        if self._unsettled is not None:
            await self._recover(deadline)
        if self._segments.due():
            await self._close_segment(deadline)
        await self._segments.open(self._head.next_seq, deadline)

    async def _recover(self, deadline: float) -> None:
        """Take the chain head from what the failed batch really left on disk."""
        batch, segment = self._unsettled, self._segments.current
        if batch is None or segment is None:
            self._unsettled = None
            return
        confirmed = segment.size
        last = await self._segments.reread(deadline)
        if last is None:
            if self._head.next_seq != segment.first_seq:
                raise AuditUnavailable(f"audit segment {segment.path.name} lost its records")
        else:
            settled = batch.settled(last)
            if settled is None:
                raise AuditUnavailable(f"audit segment {segment.path.name} tail does not match")
            # Part or all of the batch we reported as failed may have landed: those records
            # stand (they over-report refused issues, the safe direction) and the chain
            # continues after them.
            self._records += settled.next_seq - self._head.next_seq
            self._local_bytes += max(0, segment.size - confirmed)
            self._head = settled
        self._unsettled = None
        log.warning("audit log recovered at seq %d", self._head.seq)

    # ---- checkpoints and rotation ----------------------------------------------------------

    def _healthy(self) -> bool:
        return self._unsettled is None and not self._disk.stalled

    async def _checkpoint(self, segment_name: str, deadline: float | None = None) -> Path | None:
        written = await self._checkpoints.write(self._head, segment_name, deadline)
        if written is None:
            return None
        path, size = written
        self._local_bytes += size
        return path

    async def _close_segment(self, deadline: float | None = None) -> None:
        if self._segments.current is None:
            return
        # Named after the next segment: a copy holding only closed segments must then contain
        # this one entirely, so deleting the newest closed segment cannot pass for "not shipped".
        checkpoint = await self._checkpoint(segment_name(self._head.next_seq), deadline)
        self._notify(await self._segments.seal(deadline))
        self._notify(checkpoint)

    async def _maintain(self) -> None:
        """Time-based checkpoints and age-based rotation, so an idle log still ships."""
        every = (self._checkpoints.every_seconds, self._segments.max_seconds)
        tick = max(0.05, min(1.0, *every))
        while True:
            await asyncio.sleep(tick)
            await self._checkpoints.refresh_witnesses()
            async with self._lock:
                if not self._disk.running or not self._healthy():
                    continue
                segment = self._segments.current
                try:
                    if self._segments.aged():
                        await self._close_segment()
                    elif segment is not None and self._checkpoints.due_by_time():
                        self._notify(await self._checkpoint(segment.path.name))
                except AuditUnavailable as exc:
                    log.warning("audit maintenance failed: %s", exc.detail)

    def _notify(self, path: Path | None) -> None:
        if self._on_closed is None or path is None:
            return
        try:
            self._on_closed(path)
        except Exception:
            log.exception("audit on_segment_closed callback failed for %s", path.name)


def _fail(waiters: list[_Waiter], detail: str) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            # One exception each: a shared instance would collect every caller's traceback.
            waiter.future.set_exception(AuditUnavailable(detail))


def _checked_body(record: Mapping[str, object]) -> dict[str, object]:
    clash = chain.WRITER_FIELDS & set(record)
    if clash:
        raise ValueError(f"audit record must not set {sorted(clash)}; the writer does")
    if not all(isinstance(key, str) for key in record):
        raise ValueError("audit record keys must be strings")
    body = dict(record)
    chain.canonical_json(body)  # raises TypeError/ValueError now rather than mid-chain
    return body
