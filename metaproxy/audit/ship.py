"""Ships closed segments and checkpoints to S3, off the append path.

Uploads run on the shipper's own executor in the order the files were handed over, the head
of the queue retried with capped exponential backoff and full jitter; a later file never
overtakes an earlier one, so the S3 copy is always a prefix of the local log and verifies as
one. Nothing here can block or fail `AuditLog.append`: `enqueue` only appends to a list.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from metaproxy.audit.checkpoint import parse_checkpoint
from metaproxy.audit.names import CHECKPOINT_DIR, CHECKPOINT_RE, LATEST_NAME, segment_first_seq

log = logging.getLogger("metaproxy.audit.ship")


class S3Shipper:
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        client_factory: Callable[[], Any],
        executor_workers: int = 1,
        retry_base_seconds: float = 0.5,
        retry_max_seconds: float = 60.0,
        on_uploaded: Callable[[Path], Awaitable[None]] | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3Shipper needs a bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client_factory = client_factory
        self._client: Any = None
        self._workers = max(1, executor_workers)
        self._retry_base = retry_base_seconds
        self._retry_max = retry_max_seconds
        self._queue: collections.deque[Path] = collections.deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._latest_seq = 0
        # Told every file once it is in S3 (the broker prunes its local copy then).
        self._on_uploaded = on_uploaded
        self.uploaded = 0
        self.failures = 0

    def key_for(self, path: Path) -> str | None:
        """The object key mirroring the local layout, or None for a file we do not ship."""
        if path.parent.name == CHECKPOINT_DIR and CHECKPOINT_RE.match(path.name):
            relative = f"{CHECKPOINT_DIR}/{path.name}"
        elif segment_first_seq(path.name) is not None:
            relative = path.name
        else:
            return None
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def enqueue(self, path: Path) -> None:
        """Queue a closed segment or a checkpoint for upload; never blocks, never raises."""
        if self.key_for(path) is None:
            log.warning("audit shipper: ignoring %s (not a segment or checkpoint)", path.name)
            return
        self._queue.append(path)
        self._drained.clear()
        self._wake.set()

    def stats(self) -> dict[str, float]:
        return {
            "uploaded": float(self.uploaded),
            "failures": float(self.failures),
            "pending": float(len(self._queue)),
        }

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self._workers, thread_name_prefix="audit-ship"
        )
        self._task = asyncio.create_task(self._run(), name="audit-shipper")

    async def aclose(self, drain_seconds: float = 10.0) -> None:
        """Give the queue up to `drain_seconds` to empty, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_seconds):
                await self._drained.wait()
        if self._queue:
            log.warning("audit shipper stopped with %d files not uploaded", len(self._queue))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def backfill(self, directory: Path) -> int:
        """Queue local closed segments and checkpoints missing from S3 (after a crash)."""
        existing = await self._call(self._list_keys)
        candidates: list[Path] = await self._call(self._local_files, directory)
        missing = [p for p in candidates if self.key_for(p) not in existing]
        for path in missing:
            self.enqueue(path)
        return len(missing)

    def _local_files(self, directory: Path) -> list[Path]:
        """Closed segments in chain order, then checkpoints.

        The newest segment counts as closed only once a checkpoint says the log continues in a
        later one (written at rotation, close and restart); otherwise the writer may have it open.
        """
        segments = sorted(
            (p for p in directory.iterdir() if segment_first_seq(p.name) is not None),
            key=lambda p: segment_first_seq(p.name) or 0,
        )
        checkpoint_dir = directory / CHECKPOINT_DIR
        checkpoints = (
            sorted(p for p in checkpoint_dir.iterdir() if self.key_for(p))
            if checkpoint_dir.is_dir()
            else []
        )
        if segments:
            continues_at = 0
            if checkpoints:
                with contextlib.suppress(OSError, ValueError):
                    newest = parse_checkpoint(checkpoints[-1].read_bytes())
                    continues_at = segment_first_seq(newest.segment) or 0
            if continues_at <= (segment_first_seq(segments[-1].name) or 0):
                segments.pop()
        return segments + checkpoints

    async def _run(self) -> None:
        failures_in_a_row = 0
        while True:
            if not self._queue:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            path = self._queue[0]
            try:
                await self._call(self._upload, path)
            except Exception as exc:
                self.failures += 1
                failures_in_a_row += 1
                delay = random.uniform(  # noqa: S311 - jitter, not a secret
                    0, min(self._retry_max, self._retry_base * 2**failures_in_a_row)
                )
                log.warning(
                    "audit upload of %s failed (%s); retrying in %.1fs",
                    path.name,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures_in_a_row = 0
            self._queue.popleft()
            self.uploaded += 1
            if self._on_uploaded is not None:
                try:
                    await self._on_uploaded(path)
                except Exception:
                    log.exception("audit shipper: on_uploaded failed for %s", path.name)

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            raise RuntimeError("audit shipper is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _upload(self, path: Path) -> None:
        key = self.key_for(path)
        if key is None:
            return
        body = path.read_bytes()
        content_type = "application/json" if path.suffix == ".json" else "application/x-ndjson"
        self._s3().put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        match = CHECKPOINT_RE.match(path.name)
        if match and int(match.group(1)) > self._latest_seq:
            latest = f"{self.prefix}/{LATEST_NAME}" if self.prefix else LATEST_NAME
            self._s3().put_object(
                Bucket=self.bucket, Key=latest, Body=body, ContentType="application/json"
            )
            self._latest_seq = int(match.group(1))

    def _list_keys(self) -> set[str]:
        keys: set[str] = set()
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self._s3().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            keys.update(item["Key"] for item in page.get("Contents", []))
        return keys


def s3_client_factory(endpoint: str, region: str) -> Callable[[], Any]:
    """boto3 S3 clients for the shipper and the audit commands (`endpoint` "": AWS's own)."""

    def make_client() -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or None, region_name=region)

    return make_client
