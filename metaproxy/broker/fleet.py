"""This replica's place in the fleet: a heartbeat in the store's replica registry.

The registry tells each replica how many are live, which is its share of the STS budget and of
the tenant limits if it loses the store (budget ÷ live replicas last seen, never above), and
which replicas' audit checkpoints it witnesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from metaproxy.broker.store.base import ReplicaRegistry, StoreUnavailable

log = logging.getLogger("metaproxy.broker.fleet")

# A replica is live for this many missed beats: one lost beat is not a death.
LIVE_BEATS = 3


class ReplicaHeartbeat:
    def __init__(self, registry: ReplicaRegistry, instance: str, interval: float) -> None:
        self._registry = registry
        self._instance = instance
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.live: list[str] = [instance]
        self.failures = 0

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="replica-heartbeat")

    async def beat(self) -> None:
        try:
            live = await self._registry.heartbeat(self._instance, self._interval * LIVE_BEATS)
        except StoreUnavailable:
            self.failures += 1
            return
        if live != self.live:
            log.info("live replicas: %d (%s)", len(live), ", ".join(live))
        self.live = live

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.beat()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
