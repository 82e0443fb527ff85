"""The audit log's disk thread: deadlines, refusals while a job is stalled, and shutdown."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metaproxy.audit.disk import DiskWorker
from metaproxy.clock import SystemClock
from metaproxy.errors import AuditUnavailable

CLOCK = SystemClock()


@pytest.fixture
async def disk() -> AsyncIterator[DiskWorker]:
    worker = DiskWorker(write_timeout=0.2, clock=CLOCK)
    await worker.start()
    yield worker
    await worker.aclose()


def soon(seconds: float = 0.2) -> float:
    return CLOCK.monotonic() + seconds


async def test_jobs_run_in_submission_order_on_one_thread(disk: DiskWorker) -> None:
    """Results come back in order, all from the same thread, never the event loop's."""
    seen = [await disk.run(threading.get_ident, deadline=soon(5)) for _ in range(5)]
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()


def still_stalled(disk: DiskWorker) -> bool:
    return disk.stalled  # read again: the job ended meanwhile


async def test_a_job_past_its_deadline_fails_then_later_jobs_are_refused_until_it_ends(
    disk: DiskWorker,
) -> None:
    """The late job is left running; every job meanwhile is refused at once, and after it
    ends the worker takes jobs again."""
    stall = threading.Event()
    try:
        with pytest.raises(AuditUnavailable, match=r"longer than 0\.2s"):
            await disk.run(stall.wait, 30, deadline=soon())
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="still stalled"):
            await disk.run(os.getpid, deadline=soon())
        assert time.monotonic() - started < 0.1
        assert disk.stalled
    finally:
        stall.set()
    await asyncio.sleep(0.05)
    assert not still_stalled(disk)
    assert await disk.run(os.getpid, deadline=soon()) == os.getpid()
    assert disk.failures == 2


async def test_an_abandoned_job_hands_its_result_over_to_be_released(disk: DiskWorker) -> None:
    """A job that succeeds after its caller gave up passes its result to `on_abandoned`."""
    stall = threading.Event()
    released: list[str] = []

    def slow_open() -> str:
        stall.wait(30)
        return "fd 7"

    with pytest.raises(AuditUnavailable):
        await disk.run(slow_open, deadline=soon(0.05), on_abandoned=released.append)
    assert released == []
    stall.set()
    await asyncio.sleep(0.05)
    assert released == ["fd 7"]


async def test_a_failed_call_is_audit_unavailable_naming_the_os_error(
    disk: DiskWorker, tmp_path: Path
) -> None:
    """An OSError from the job becomes AuditUnavailable with the system's reason."""
    with pytest.raises(AuditUnavailable, match="No such file or directory"):
        await disk.run(os.open, tmp_path / "missing" / "file", os.O_RDONLY, deadline=soon())
    assert disk.failures == 1


async def test_close_does_not_wait_for_a_stalled_job() -> None:
    """Shutdown returns at once while a job hangs on the disk, and the worker is stopped."""
    worker = DiskWorker(write_timeout=0.05, clock=CLOCK)
    await worker.start()
    stall = threading.Event()
    try:
        with pytest.raises(AuditUnavailable):
            await worker.run(stall.wait, 30, deadline=soon(0.05))
        started = time.monotonic()
        await worker.aclose()
        assert time.monotonic() - started < 0.1
    finally:
        stall.set()
    assert not worker.running
    with pytest.raises(AuditUnavailable, match="not running"):
        await worker.run(os.getpid)
