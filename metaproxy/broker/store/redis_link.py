"""One replica's link to the store: commands with fail-fast while the store is known down.

A failed command marks the store down for `DOWN_SECONDS`: during that time calls fail at once
instead of each waiting out the connect timeout, and the background loops (heartbeat, revocation
resync) are the ones that notice it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from metaproxy.broker.store.base import StoreUnavailable
from metaproxy.broker.store.redis_conn import StoreUrl, connect

log = logging.getLogger("metaproxy.broker.store")

T = TypeVar("T")

DOWN_SECONDS = 1.0
# Commands in flight at once from one replica. redis-py's pool refuses a command past its
# connection cap (100 by default) with MaxConnectionsError instead of waiting; during a burst
# a replica has a thousand requests at the store at once, and each refusal marked a healthy
# store down (budget share, local limits, an STS call per replica). Past this they wait a turn.
MAX_COMMANDS_IN_FLIGHT = 64


class StoreLink:
    """The command client with fail-fast while the store is known to be down."""

    def __init__(self, url: StoreUrl, timeout: float, clock: Callable[[], float]) -> None:
        self.url = url
        self.client, self.pubsub_client = connect(url, timeout=timeout)
        self._clock = clock
        self._down_until = 0.0
        self.down_since: float | None = None  # when the current outage began
        self._turns = asyncio.Semaphore(MAX_COMMANDS_IN_FLIGHT)
        self.failures = 0
        self.up = False

    async def run(self, call: Callable[[], Awaitable[T]], *, probe: bool = False) -> T:
        from redis.exceptions import RedisError

        if not probe and self._clock() < self._down_until:
            raise StoreUnavailable("store marked down")
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with self._turns:
                result = await call()
            _raise_swallowed_cancel(task, cancels)
        except (RedisError, OSError, TimeoutError) as exc:
            _raise_swallowed_cancel(task, cancels)
            self.failures += 1
            if self.up:
                log.warning("store %s unreachable (%s)", self.url.redacted(), type(exc).__name__)
            self.up = False
            if self.down_since is None:
                self.down_since = self._clock()
            self._down_until = self._clock() + DOWN_SECONDS
            raise StoreUnavailable(type(exc).__name__) from None
        if not self.up:
            log.info("store %s reachable", self.url.redacted())
        self.up = True
        self.down_since = None
        self._down_until = 0.0
        return result

    def script(self, source: str) -> Any:
        return self.client.register_script(source)


def _raise_swallowed_cancel(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """redis-py (8.1) lets a command it was cancelled in finish and returns its answer (or its
    error), dropping the cancellation. A task cancelled mid-command then ran on: the shared
    cache's lease keeper kept extending its lease for ever, and with it the request that
    waited for the keeper to end and every replica waiting on that lease. Hand it back."""
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError
