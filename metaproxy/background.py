"""Work that may finish after the answer has gone: held until done, never lost to the GC.

`asyncio.create_task` keeps only a weak reference to its task: one nobody holds can be
collected mid-flight. A request that hands its bookkeeping (a store write, a slot given back)
to the background keeps the task here until it ends; `aclose` waits for what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("metaproxy.background")


class BackgroundTasks:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work, name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %s", self._name, type(task.exception()).__name__)

    async def aclose(self, seconds: float = 2.0) -> None:
        """Wait (at most `seconds`) for the work in flight, then cancel what is left."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=seconds)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task
