"""Lifetimes: a component starts, and closes with one word; a root closes in reverse order.

Every long-lived part of a process (a store connection, a background loop, a listener) is a
`Component`. A process's composition root enters them in start order on an `AsyncExitStack`
(`started`), so they close in reverse, whatever failed: no order held in comments, no part
closed by the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar


class Component(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Component)


async def started(stack: contextlib.AsyncExitStack, component: C) -> C:
    """Start `component` and have `stack` close it (only once it has started)."""
    await component.start()
    stack.push_async_callback(component.aclose)
    return component


class Background:
    """A loop that runs from `start` until `aclose` (a watcher, a poller): a component."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
