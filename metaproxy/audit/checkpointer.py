"""When one audit log pins its head in a signed checkpoint, and what becomes of the checkpoint.

A checkpoint is due every `every_records` records and every `every_seconds` (the writer's
maintenance tick asks), and is written on the log's disk thread with an atomic write, so a
crash leaves the previous checkpoint or this one. Without a signing key there are none. A
failed checkpoint write only counts and logs: the records it would have pinned are durable
already, and the next checkpoint pins them too.

In a fleet each checkpoint also carries the other replicas' latest checkpoints as witnesses
(`witness.py`), refreshed off the writer's lock, and is published for them once durable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from metaproxy.audit.chain import iso_millis
from metaproxy.audit.checkpoint import WitnessedCheckpoint, file_digest, sign_checkpoint
from metaproxy.audit.disk import DiskWorker
from metaproxy.audit.head import ChainHead
from metaproxy.audit.names import CHECKPOINT_DIR, checkpoint_name
from metaproxy.audit.signing_keys import load_private_key
from metaproxy.audit.witness import Witnessing
from metaproxy.clock import Clock
from metaproxy.errors import AuditUnavailable
from metaproxy.fsutil import write_atomically

log = logging.getLogger("metaproxy.audit")


class Checkpointer:
    """Signs and stores checkpoints of one log's head in `directory/checkpoints/`."""

    def __init__(
        self,
        directory: Path,
        disk: DiskWorker,
        witnessing: Witnessing,
        clock: Clock,
        *,
        log_id: str,
        signing_key: Path | None,
        every_records: int,
        every_seconds: float,
        write_timeout: float,
    ) -> None:
        self._directory = directory
        self._disk = disk
        self._witnessing = witnessing
        self._clock = clock
        self._log_id = log_id
        self._key_path = signing_key
        self._key: Any = None
        self.every_records = max(1, every_records)
        self.every_seconds = every_seconds
        self._write_timeout = write_timeout
        self.seq = 0  # the newest checkpoint's
        self._at = 0.0  # monotonic, when it was written (or the log started)
        self.written = 0

    def start(self, newest_seq: int) -> None:
        """Load the key; `newest_seq` is the newest checkpoint already on disk."""
        if self._key_path is not None:
            self._key = load_private_key(self._key_path)
        self.seq, self._at = newest_seq, self._clock.monotonic()

    @property
    def signing(self) -> bool:
        return self._key is not None

    def batch_limit(self, head: ChainHead) -> int | None:
        """The last seq a batch linked to `head` may take, so that the checkpoint due falls
        right after it; None when no checkpoint is due ahead (an overdue one, whose write
        failed, must not shrink every later batch to one record)."""
        due = self.seq + self.every_records
        return due if self.signing and due >= head.next_seq else None

    def due_by_records(self, head: ChainHead) -> bool:
        return head.seq - self.seq >= self.every_records

    def due_by_time(self) -> bool:
        return self._clock.monotonic() - self._at >= self.every_seconds

    async def write(
        self, head: ChainHead, segment: str, deadline: float | None = None
    ) -> tuple[Path, int] | None:
        """Sign and store a checkpoint of `head`: the file and its size, or None when there
        is nothing new to pin, no key, or the write failed (counted and logged only).

        `segment` is where the log continues after the head: the open segment, or the next
        one when the current segment is being closed.
        """
        if self._key is None or head.seq < 1 or head.seq <= self.seq:
            return None
        checkpoint = sign_checkpoint(
            self._key,
            log_id=self._log_id,
            seq=head.seq,
            head=head.hash,
            time=iso_millis(self._clock.now()),
            segment=segment,
            witness=self._witnessing.current,
        )
        path = self._directory / CHECKPOINT_DIR / checkpoint_name(head.seq)
        data = checkpoint.to_bytes() + b"\n"
        if deadline is None:
            deadline = self._clock.monotonic() + self._write_timeout
        try:
            await self._disk.run(write_atomically, path, data, deadline=deadline)
        except AuditUnavailable as exc:
            log.warning("audit checkpoint at seq %d not written: %s", head.seq, exc.detail)
            return None
        self.seq, self._at = head.seq, self._clock.monotonic()
        self.written += 1
        self._witnessing.publish(
            WitnessedCheckpoint(
                self._log_id, head.seq, head.hash, file_digest(data), checkpoint.time
            )
        )
        return path, len(data)

    async def refresh_witnesses(self) -> None:
        if self._key is not None:  # no key, no checkpoints: nothing would sign the answer
            await self._witnessing.refresh()

    async def aclose(self) -> None:
        """Wait for the last publish, so replicas closing after us witness our final head."""
        await self._witnessing.aclose()
