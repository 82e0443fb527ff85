"""The audit log's disk thread: every file operation of one log, in order, off the event loop.

One thread, so the order of the files' bytes is the order the writer submitted them in (the
chain order), and a slow disk never blocks the event loop. A job that outlasts its deadline is
not cancelled, since a running write cannot be stopped: its caller gets `AuditUnavailable` and
the worker refuses every later job until that one ends ("still stalled"). A queued and a
running stall therefore look alike to the writer, whose recovery reads the disk to learn what
the job did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from metaproxy.clock import Clock
from metaproxy.errors import AuditUnavailable

T = TypeVar("T")


class DiskWorker:
    """A single-thread executor with deadlines, owned by one audit log; counts its failures."""

    def __init__(self, *, write_timeout: float, clock: Clock) -> None:
        self._write_timeout = write_timeout
        self._clock = clock
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[Any] | None = None
        self.failures = 0

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")

    async def aclose(self) -> None:
        """Stop the thread; wait for it unless a job is stalled (the OS closes our fds at exit,
        and a stalled disk must not hang shutdown)."""
        if self._executor is not None:
            self._executor.shutdown(wait=not self.stalled, cancel_futures=True)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._executor is not None

    @property
    def stalled(self) -> bool:
        """A job submitted earlier has not ended yet."""
        return self._pending is not None and not self._pending.done()

    def ensure_free(self) -> None:
        """Raise `AuditUnavailable` unless a job submitted now would run next. A caller that
        hands a job a resource to release checks this first: refused, the resource stays its."""
        if self._executor is None:
            raise AuditUnavailable("audit log is not running")
        if self.stalled:
            self.failures += 1
            raise AuditUnavailable("an earlier audit write is still stalled")

    async def run(
        self,
        func: Callable[..., T],
        *args: Any,
        deadline: float | None = None,
        on_abandoned: Callable[[T], None] | None = None,
    ) -> T:
        """`func(*args)` on the disk thread by `deadline` (monotonic), or `AuditUnavailable`.

        `on_abandoned` gets the result of a job that succeeded after its caller stopped waiting
        (deadline passed, or cancelled), to release what it opened."""
        self.ensure_free()
        assert self._executor is not None
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
            self.failures += 1
            self._abandon(future, on_abandoned)
            raise AuditUnavailable(f"audit write took longer than {self._write_timeout}s") from None
        except asyncio.CancelledError:
            self._abandon(future, on_abandoned)
            raise
        except OSError as exc:
            self.failures += 1
            raise AuditUnavailable(f"audit write failed: {exc.strerror or exc}") from None

    @staticmethod
    def _abandon(future: concurrent.futures.Future[T], release: Callable[[T], None] | None) -> None:
        if release is not None:
            future.add_done_callback(functools.partial(_release_result, release))


def _release_result(release: Callable[[T], None], future: concurrent.futures.Future[T]) -> None:
    if not future.cancelled() and future.exception() is None:
        release(future.result())


def _consume_outcome(waiter: asyncio.Future[Any]) -> None:
    """Retrieve a late job's outcome so asyncio does not report it as never retrieved."""
    if not waiter.cancelled():
        waiter.exception()
