"""The fleet side of one audit writer: what it witnesses of the others, and what it publishes.

The store (the broker's `ReplicaRegistry`, or anything with the same two calls) is asked for
the other replicas' latest checkpoints off the writer's lock, and the answer is kept as a
snapshot that checkpoints sign; durable checkpoints are published in the background, newest
first. Every call is capped: a slow or unreachable store costs a checkpoint its witnesses,
never an append its latency or its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from metaproxy.audit.chain import is_hex_hash
from metaproxy.audit.checkpoint import Witness, WitnessedCheckpoint

log = logging.getLogger("metaproxy.audit")

# The store answers in a millisecond or two; past this it counts as unreachable.
WITNESS_TIMEOUT: Final = 0.5

WitnessSource = Callable[[], Awaitable[Mapping[str, WitnessedCheckpoint]]]
CheckpointListener = Callable[[WitnessedCheckpoint], Awaitable[None]]


class Witnessing:
    def __init__(
        self,
        log_id: str,
        *,
        source: WitnessSource | None,
        on_checkpoint: CheckpointListener | None,
        timeout: float = WITNESS_TIMEOUT,
    ) -> None:
        self._log_id = log_id
        self._source = source
        self._on_checkpoint = on_checkpoint
        self._timeout = timeout
        self._failing = False
        self._to_publish: WitnessedCheckpoint | None = None
        self._publisher: asyncio.Task[None] | None = None
        self.current: dict[str, Witness] = {}

    async def refresh(self) -> None:
        """Replace the snapshot of the other replicas' checkpoints; on failure, empty it.

        Empty, not stale, on failure: a checkpoint then says nothing rather than something
        old, and it is still written, because an unreachable store must never stop the log.
        """
        if self._source is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                latest = await self._source()
            witnessed = self._usable(latest)
        except Exception as exc:
            if not self._failing:  # once per outage, not once per tick
                log.warning(
                    "audit witness source failed (%s); checkpoints carry no witnesses until "
                    "it answers again",
                    type(exc).__name__,
                )
            self._failing, self.current = True, {}
            return
        if self._failing:
            log.warning("audit witness source answers again")
        self._failing, self.current = False, witnessed

    def _usable(self, latest: Mapping[str, WitnessedCheckpoint]) -> dict[str, Witness]:
        """The entries fit to sign: another log's, well formed (the store is outside input)."""
        witnessed: dict[str, Witness] = {}
        for entry in latest.values():
            if entry.log_id == self._log_id:
                continue  # our own checkpoint, as published: witnessing it proves nothing
            if not (
                isinstance(entry.log_id, str)
                and entry.log_id
                and isinstance(entry.seq, int)
                and not isinstance(entry.seq, bool)
                and entry.seq >= 1
                and is_hex_hash(entry.head)
                and is_hex_hash(entry.digest)
            ):
                log.warning("audit witness source: ignoring a malformed entry")
                continue
            witnessed[entry.log_id] = Witness(entry.seq, entry.head, entry.digest)
        return witnessed

    def publish(self, checkpoint: WitnessedCheckpoint) -> None:
        """Hand a durable checkpoint to `on_checkpoint` in the background; the newest wins."""
        if self._on_checkpoint is None:
            return
        self._to_publish = checkpoint
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_latest(), name="audit-publish")

    async def aclose(self) -> None:
        """Wait for the last publish (each is capped, so this is too); never cancels it."""
        if self._publisher is not None:
            await asyncio.wait({self._publisher})

    async def _publish_latest(self) -> None:
        # One at a time: two concurrent publishes could land out of order and leave the
        # store showing an older checkpoint than the newest one.
        while self._on_checkpoint is not None and self._to_publish is not None:
            checkpoint, self._to_publish = self._to_publish, None
            try:
                async with asyncio.timeout(self._timeout):
                    await self._on_checkpoint(checkpoint)
            except Exception as exc:
                log.warning(
                    "audit checkpoint at seq %d not published for witnessing (%s)",
                    checkpoint.seq,
                    type(exc).__name__,
                )
