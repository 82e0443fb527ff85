"""The audit writer: appends hash-chained records to segment files, fsynced, fail closed.

Group commit: appends that arrive while a write is in flight queue up, and the next batch
chains them in arrival order and stores them with one `os.write` and one `fsync`; each caller
gets its record back only once the fsync covering it succeeded. One fsync per record capped a
broker at ~260 records/s on a slow disk, with requests queueing seconds for the lock.

Every disk operation runs on a dedicated single-thread executor, so the event loop never
blocks on a slow disk and the file order equals the chain order. A batch that fails or
outlasts `write_timeout` raises `AuditUnavailable` in every caller of the batch (the broker
then refuses to issue); any prefix of the batch may be on disk, so before the next batch the
writer re-reads the segment's tail and takes the chain head from what is really there.
Rotation and checkpoints happen only between batches.

In a fleet each checkpoint also witnesses the other replicas' latest checkpoints
(`witness.py`), asked for on the maintenance tick and before the final checkpoint, off the lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from metaproxy.audit import chain
from metaproxy.audit.chain import iso_millis, read_tail, sorted_segments
from metaproxy.audit.checkpoint import (
    WitnessedCheckpoint,
    checkpoint_name,
    file_digest,
    load_private_key,
    sign_checkpoint,
)
from metaproxy.audit.witness import (
    WITNESS_TIMEOUT,
    CheckpointListener,
    Witnessing,
    WitnessSource,
)
from metaproxy.clock import Clock, SystemClock
from metaproxy.errors import AuditUnavailable
from metaproxy.fsutil import fsync_dir, write_atomically

log = logging.getLogger("metaproxy.audit")

T = TypeVar("T")
CHECKPOINT_DIR: Final = "checkpoints"
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# Bounds on one group commit: a batch holds the records of callers that all wait for it, and
# a megabyte is a few milliseconds of disk bandwidth, well inside any sane write_timeout.
MAX_BATCH_RECORDS: Final = 512
MAX_BATCH_BYTES: Final = 1 << 20


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    fd: int | None
    size: int
    opened_at: float  # monotonic


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
        checkpoint_every_seconds: float = 60,
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
        self._key_path = signing_key
        self._segment_max_bytes = segment_max_bytes
        self._segment_max_seconds = segment_max_seconds
        self._checkpoint_every_records = max(1, checkpoint_every_records)
        self._checkpoint_every_seconds = checkpoint_every_seconds
        self._write_timeout = write_timeout
        # The local directory is a buffer in front of the sink: bounded, and when full the
        # broker refuses to issue (503) rather than fill the volume and get evicted. 0: none.
        self._max_local_bytes = max_local_bytes
        self._local_bytes = 0
        self._clock: Clock = clock or SystemClock()
        # Called with every file that became immutable: closed segments and new checkpoints.
        self._on_closed = on_segment_closed
        # Where the other replicas' latest checkpoints come from, and where ours go once
        # durable; both capped at `witness_timeout`, and free to fail.
        self._fleet = Witnessing(
            log_id, source=witness, on_checkpoint=on_checkpoint, timeout=witness_timeout
        )
        self._key: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._segment: _Segment | None = None
        self._next_seq = chain.FIRST_SEQ
        self._head = chain.ZERO_HASH
        self._pending: concurrent.futures.Future[Any] | None = None
        self._needs_recovery = False
        # Hashes of the batch a failed write may have stored any prefix of, from `_next_seq` on.
        self._uncertain_hashes: list[str] = []
        self._queue: deque[_Waiter] = deque()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._checkpoint_seq = 0
        self._checkpoint_at = 0.0
        self._maintenance: asyncio.Task[None] | None = None
        self._records = 0
        self._failures = 0
        self._checkpoints = 0
        self._batches = 0
        self._largest_batch = 0
        self._last_write_seconds = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory or resume the chain after the newest record on disk."""
        if self._key_path is not None:
            self._key = load_private_key(self._key_path)
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")
        loop = asyncio.get_running_loop()
        try:
            resumed = await loop.run_in_executor(self._executor, self._resume_sync)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open audit directory: {exc.strerror}") from None
        last_record, newest_segment, newest_checkpoint, self._local_bytes = resumed
        if last_record is not None:
            self._next_seq = int(last_record["seq"]) + 1  # type: ignore[call-overload]
            self._head = str(last_record["hash"])
        if newest_checkpoint >= self._next_seq:
            # Checkpoints are written only after their records are fsynced, so a checkpoint
            # past the head means records were lost or removed; extending would fork the chain.
            raise AuditUnavailable(
                f"audit log ends at seq {self._next_seq - 1} but a checkpoint covers seq "
                f"{newest_checkpoint}; investigate, or start a new log in a new directory"
            )
        self._checkpoint_seq = newest_checkpoint
        self._checkpoint_at = self._clock.monotonic()
        if newest_segment is not None:
            await self._refresh_witnesses()
            # A restart never appends to a file a crashed process may have been writing:
            # pin the old head in a checkpoint, hand the segment to the shipper, open anew.
            async with self._lock:
                checkpoint = await self._checkpoint(chain.segment_name(self._next_seq))
            # The segment before the checkpoint naming its successor: a copy never holds that
            # checkpoint without the segment, which would read as a deleted tail.
            self._notify(newest_segment)
            self._notify(checkpoint)
        self._maintenance = asyncio.create_task(self._maintain(), name="audit-maintenance")

    async def close(self) -> None:
        """Commit what is queued, write a final checkpoint, close the segment, stop the executor."""
        self._closing = True
        if self._committer is not None:
            # asyncio.wait, not await: a cancelled close must not cancel the callers' batch.
            await asyncio.wait({self._committer})
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._executor is not None:
            # The final checkpoint is the one other replicas most need to have seen.
            await self._refresh_witnesses()
        async with self._lock:
            if self._executor is None:
                return
            if self._healthy():
                with contextlib.suppress(AuditUnavailable):
                    await self._close_segment()
            stalled = self._pending is not None and not self._pending.done()
            # A stalled disk must not hang shutdown; the OS closes our fds at exit.
            self._executor.shutdown(wait=not stalled, cancel_futures=True)
            self._executor = None
        # Published before we go, so replicas closing after us witness our final head.
        await self._fleet.aclose()

    async def prune(self, path: Path) -> None:
        """Remove the local copy of a file the sink now holds (`S3Shipper(on_uploaded=...)`).

        The newest segment and the newest checkpoint stay: a restart resumes the chain from
        them (with no segment left it would start a new chain at seq 1)."""
        # Not on the disk thread: the shipper keeps uploading (and pruning) after close.
        freed = await asyncio.to_thread(_prune_sync, self.directory, path)
        self._local_bytes = max(0, self._local_bytes - freed)

    def stats(self) -> dict[str, float]:
        """Counters; `batches` is the number of record fsyncs (one per group commit)."""
        return {
            "local_bytes": float(self._local_bytes),
            "records": float(self._records),
            "failures": float(self._failures),
            "checkpoints": float(self._checkpoints),
            "batches": float(self._batches),
            "largest_batch": float(self._largest_batch),
            "last_write_seconds": self._last_write_seconds,
            "seq": float(self._next_seq - 1),
        }

    # ---- appending -------------------------------------------------------------------------

    async def append(self, record: Mapping[str, object]) -> dict[str, object]:
        """Chain, write and fsync one record; raise AuditUnavailable if that cannot be done."""
        body = _checked_body(record)
        if self._executor is None or self._closing:
            raise AuditUnavailable("audit log is not running")
        if self._max_local_bytes and self._local_bytes >= self._max_local_bytes:
            # Fail closed, never evict: what is here has not reached the sink yet.
            self._failures += 1
            raise AuditUnavailable(
                f"local audit buffer full ({self._local_bytes} bytes not yet shipped and pruned)"
            )
        future: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter({"time": iso_millis(self._clock.now()), **body}, future))
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
        batch: list[_Waiter] = []
        started = self._clock.monotonic()
        deadline = started + self._write_timeout
        try:
            if self._executor is None:
                raise AuditUnavailable("audit log is not running")
            segment = await self._ready_segment(deadline)
            if segment.fd is None:
                raise AuditUnavailable("audit segment is not open")
            batch, data = self._chain(taken, segment)
            self._queue.extendleft(reversed(taken[len(batch) :]))
            # Until the write is confirmed its fate is unknown: recovery reads the tail.
            self._needs_recovery = True
            self._uncertain_hashes = [str(waiter.record["hash"]) for waiter in batch]
            await self._run(_write_all, segment.fd, data, deadline=deadline)
        except AuditUnavailable as exc:
            _fail(batch or taken, exc.detail)
            return
        except asyncio.CancelledError:
            _fail(batch or taken, "audit log is shutting down")
            raise
        except Exception:
            log.exception("audit batch failed unexpectedly")
            _fail(batch or taken, "audit write failed: internal error")
            return
        self._needs_recovery = False
        self._last_write_seconds = self._clock.monotonic() - started
        self._head, self._next_seq = str(batch[-1].record["hash"]), self._next_seq + len(batch)
        segment.size += len(data)
        self._local_bytes += len(data)
        self._records += len(batch)
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(batch))
        for waiter in batch:
            if not waiter.future.done():
                waiter.future.set_result(waiter.record)
        if self._next_seq - 1 - self._checkpoint_seq >= self._checkpoint_every_records:
            self._notify(await self._checkpoint(segment.path.name))

    def _take_waiters(self) -> list[_Waiter]:
        """Up to a batch of queued appends whose callers still wait, in arrival order."""
        taken: list[_Waiter] = []
        while self._queue and len(taken) < MAX_BATCH_RECORDS:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                taken.append(waiter)
        return taken

    def _chain(self, taken: list[_Waiter], segment: _Segment) -> tuple[list[_Waiter], bytes]:
        """Give the leading waiters seq, prev and hash, stopping at a batch, segment or
        checkpoint boundary so rotation and checkpoints stay as exact as with single writes."""
        head, seq = self._head, self._next_seq
        checkpoint_due = self._checkpoint_seq + self._checkpoint_every_records
        # An overdue checkpoint (its write failed) must not shrink every later batch to one.
        stop_at_checkpoint = self._key is not None and checkpoint_due >= seq
        lines: list[bytes] = []
        size = 0
        for waiter in taken:
            if lines and (
                size >= MAX_BATCH_BYTES
                or segment.size + size >= self._segment_max_bytes
                or (stop_at_checkpoint and seq > checkpoint_due)
            ):
                break
            full = waiter.record
            full["seq"], full["prev"] = seq, head
            full["hash"] = head = chain.record_hash(head, full)
            line = chain.record_line(full)
            lines.append(line)
            size += len(line)
            seq += 1
        return taken[: len(lines)], b"".join(lines)

    async def _ready_segment(self, deadline: float) -> _Segment:
        if self._needs_recovery:
            await self._recover(deadline)
        segment = self._segment
        if segment is not None and (
            segment.size >= self._segment_max_bytes
            or self._clock.monotonic() - segment.opened_at >= self._segment_max_seconds
        ):
            await self._close_segment(deadline)
            segment = None
        if segment is None:
            path = self.directory / chain.segment_name(self._next_seq)
            earlier_job = self._pending
            try:
                fd, size = await self._run(_open_segment, path, deadline=deadline)
            except (AuditUnavailable, asyncio.CancelledError):
                late_open = self._pending
                if late_open is not None and late_open is not earlier_job:
                    late_open.add_done_callback(_close_opened_fd)  # its fd must not leak
                raise
            segment = _Segment(path, self._next_seq, fd, size, self._clock.monotonic())
            self._segment = segment
        return segment

    async def _recover(self, deadline: float) -> None:
        segment = self._segment
        if segment is None:
            self._needs_recovery = False
            return
        earlier_job = self._pending
        try:
            last, fd, size = await self._run(
                _reopen_at_tail, segment.path, segment.fd, segment.first_seq, deadline=deadline
            )
        except (AuditUnavailable, asyncio.CancelledError):
            late_reopen = self._pending
            if late_reopen is not None and late_reopen is not earlier_job:
                # The job closes the old fd whenever it runs; the fd it opens must not leak.
                segment.fd = None
                late_reopen.add_done_callback(functools.partial(_close_opened_fd, index=1))
            raise  # refused before submitting ("still stalled"): the old fd stays ours
        segment.fd, segment.size = fd, size
        if last is None:
            if self._next_seq != segment.first_seq:
                raise AuditUnavailable(f"audit segment {segment.path.name} lost its records")
        elif (landed := self._landed_prefix(last)) > 0:
            # Part or all of the batch we reported as failed did land: those records stand (they
            # over-report refused issues, the safe direction) and the chain continues after them.
            self._head, self._next_seq = str(last["hash"]), self._next_seq + landed
            self._records += landed
        elif not (last["seq"] == self._next_seq - 1 and last["hash"] == self._head):
            raise AuditUnavailable(f"audit segment {segment.path.name} tail does not match")
        self._needs_recovery = False
        self._uncertain_hashes = []
        log.warning("audit log recovered at seq %d", self._next_seq - 1)

    def _landed_prefix(self, last: Mapping[str, object]) -> int:
        """How many records of the failed batch are on disk, judged by the last one there."""
        seq = last["seq"]
        if not isinstance(seq, int):
            return 0
        index = seq - self._next_seq
        if (
            0 <= index < len(self._uncertain_hashes)
            and last["hash"] == self._uncertain_hashes[index]
        ):
            return index + 1  # its hash chains back through every earlier record of the batch
        return 0

    async def _run(self, func: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """Run `func` on the disk thread within the deadline, or raise AuditUnavailable."""
        if self._executor is None:
            raise AuditUnavailable("audit log is not running")
        if self._pending is not None and not self._pending.done():
            self._failures += 1
            raise AuditUnavailable("an earlier audit write is still stalled")
        future = self._executor.submit(func, *args)
        self._pending = future
        waiter = asyncio.wrap_future(future)
        waiter.add_done_callback(_consume_outcome)
        timeout = None if deadline is None else max(0.0, deadline - self._clock.monotonic())
        try:
            # Shielded: a timed-out job is left to finish (it cannot be stopped once running
            # anyway), so queued and running stalls behave alike and recovery sorts out both.
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            self._failures += 1
            raise AuditUnavailable(f"audit write took longer than {self._write_timeout}s") from None
        except OSError as exc:
            self._failures += 1
            raise AuditUnavailable(f"audit write failed: {exc.strerror or exc}") from None

    # ---- checkpoints and rotation ----------------------------------------------------------

    def _healthy(self) -> bool:
        return not self._needs_recovery and (self._pending is None or self._pending.done())

    async def _checkpoint(self, segment_name: str, deadline: float | None = None) -> Path | None:
        """Sign and store a checkpoint of the current head; failures only count and log.

        `segment_name` is where the log continues after the head: the open segment, or the
        next one when the current segment is being closed.
        """
        seq = self._next_seq - 1
        if self._key is None or seq < 1 or seq <= self._checkpoint_seq:
            return None
        checkpoint = sign_checkpoint(
            self._key,
            log_id=self.log_id,
            seq=seq,
            head=self._head,
            time=iso_millis(self._clock.now()),
            segment=segment_name,
            witness=self._fleet.current,
        )
        path = self.directory / CHECKPOINT_DIR / checkpoint_name(seq)
        data = checkpoint.to_bytes() + b"\n"
        if deadline is None:
            deadline = self._clock.monotonic() + self._write_timeout
        try:
            await self._run(write_atomically, path, data, deadline=deadline)
        except AuditUnavailable as exc:
            log.warning("audit checkpoint at seq %d not written: %s", seq, exc.detail)
            return None
        self._checkpoint_seq, self._checkpoint_at = seq, self._clock.monotonic()
        self._local_bytes += len(data)
        self._checkpoints += 1
        self._fleet.publish(
            WitnessedCheckpoint(self.log_id, seq, self._head, file_digest(data), checkpoint.time)
        )
        return path

    async def _close_segment(self, deadline: float | None = None) -> None:
        segment = self._segment
        if segment is None:
            return
        # Named after the next segment: a copy holding only closed segments must then contain
        # this one entirely, so deleting the newest closed segment cannot pass for "not shipped".
        checkpoint = await self._checkpoint(chain.segment_name(self._next_seq), deadline)
        self._segment = None
        with contextlib.suppress(AuditUnavailable):
            if segment.fd is not None:
                await self._run(os.close, segment.fd, deadline=deadline)
            if segment.size == 0:  # opened but never written (the write failed): no empty files
                await self._run(_unlink_if_empty, segment.path, deadline=deadline)
        if segment.size > 0:
            self._notify(segment.path)
        self._notify(checkpoint)

    async def _maintain(self) -> None:
        """Time-based checkpoints and age-based rotation, so an idle log still ships."""
        tick = max(0.05, min(1.0, self._checkpoint_every_seconds, self._segment_max_seconds))
        while True:
            await asyncio.sleep(tick)
            await self._refresh_witnesses()
            async with self._lock:
                if self._executor is None or not self._healthy():
                    continue
                now = self._clock.monotonic()
                segment = self._segment
                try:
                    if (
                        segment is not None
                        and segment.size > 0
                        and now - segment.opened_at >= self._segment_max_seconds
                    ):
                        await self._close_segment()
                    elif segment is not None and (
                        now - self._checkpoint_at >= self._checkpoint_every_seconds
                    ):
                        self._notify(await self._checkpoint(segment.path.name))
                except AuditUnavailable as exc:
                    log.warning("audit maintenance failed: %s", exc.detail)

    async def _refresh_witnesses(self) -> None:
        if self._key is not None:  # no key, no checkpoints: nothing would sign the answer
            await self._fleet.refresh()

    def _notify(self, path: Path | None) -> None:
        if self._on_closed is None or path is None:
            return
        try:
            self._on_closed(path)
        except Exception:
            log.exception("audit on_segment_closed callback failed for %s", path.name)

    # ---- start-up (runs on the disk thread) ------------------------------------------------

    def _resume_sync(self) -> tuple[dict[str, object] | None, Path | None, int, int]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / CHECKPOINT_DIR).mkdir(mode=0o700, exist_ok=True)
        newest_checkpoint = 0
        local_bytes = 0
        for entry in (self.directory / CHECKPOINT_DIR).iterdir():
            if entry.name.startswith("checkpoint-") and entry.name.endswith(".json"):
                local_bytes += entry.stat().st_size
                with contextlib.suppress(ValueError):
                    newest_checkpoint = max(newest_checkpoint, int(entry.name[11:23]))
        local_bytes += sum(path.stat().st_size for _, path in sorted_segments(self.directory))
        for first_seq, path in reversed(sorted_segments(self.directory)):
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
            return last, path, newest_checkpoint, local_bytes
        return None, None, newest_checkpoint, local_bytes


def _prune_sync(directory: Path, path: Path) -> int:
    """Unlink `path` unless it is the newest segment or checkpoint; the bytes freed."""
    if path.parent.name == CHECKPOINT_DIR:
        newest = max((p.name for p in path.parent.glob("checkpoint-*.json")), default="")
        if path.name >= newest:
            return 0
    else:
        segments = sorted_segments(directory)
        if not segments or path.name >= segments[-1][1].name:
            return 0
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _close_opened_fd(future: concurrent.futures.Future[Any], index: int = 0) -> None:
    if not future.cancelled() and future.exception() is None:
        with contextlib.suppress(OSError):
            os.close(future.result()[index])


def _fail(waiters: list[_Waiter], detail: str) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            # One exception each: a shared instance would collect every caller's traceback.
            waiter.future.set_exception(AuditUnavailable(detail))


def _consume_outcome(waiter: asyncio.Future[Any]) -> None:
    """Retrieve a late job's outcome so asyncio does not report it as never retrieved."""
    if not waiter.cancelled():
        waiter.exception()


def _checked_body(record: Mapping[str, object]) -> dict[str, object]:
    clash = chain.WRITER_FIELDS & set(record)
    if clash:
        raise ValueError(f"audit record must not set {sorted(clash)}; the writer does")
    if not all(isinstance(key, str) for key in record):
        raise ValueError("audit record keys must be strings")
    body = dict(record)
    chain.canonical_json(body)  # raises TypeError/ValueError now rather than mid-chain
    return body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _open_segment(path: Path) -> tuple[int, int]:
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        size = os.fstat(fd).st_size
        fsync_dir(path.parent)  # the new name must survive a crash too
    except OSError:
        os.close(fd)
        raise
    return fd, size


def _reopen_at_tail(
    path: Path, old_fd: int | None, first_seq: int
) -> tuple[dict[str, object] | None, int, int]:
    if old_fd is not None:
        with contextlib.suppress(OSError):
            os.close(old_fd)
    last, end, size = read_tail(path)
    if end != size:
        os.truncate(path, end)  # a partial line: the write that failed, never acknowledged
    if last is None and end != 0:
        raise AuditUnavailable(f"audit segment {path.name} has a corrupt last record")
    if last is not None and int(last["seq"]) < first_seq:  # type: ignore[call-overload]
        raise AuditUnavailable(f"audit segment {path.name} does not match its name")
    fd, size = _open_segment(path)
    try:
        os.fsync(fd)
    except OSError:
        os.close(fd)
        raise
    return last, fd, size


def _unlink_if_empty(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == 0:
            path.unlink()
