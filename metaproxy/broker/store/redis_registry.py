"""The replica registry in the store: heartbeats, and each replica's latest audit checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from metaproxy.audit.checkpoint import WitnessedCheckpoint
from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.redis_keys import CHECKPOINTS_KEY, REPLICAS_KEY
from metaproxy.broker.store.redis_link import StoreLink

log = logging.getLogger("metaproxy.broker.store")


class RedisRegistry:
    def __init__(self, conn: StoreLink) -> None:
        self._conn = conn
        self._heartbeat = conn.script(scripts.HEARTBEAT)
        self._live = 1

    async def heartbeat(self, instance: str, ttl_seconds: float) -> list[str]:
        raw = await self._conn.run(
            lambda: self._heartbeat(
                keys=[REPLICAS_KEY], args=[instance, int(ttl_seconds * 1_000_000)]
            ),
            probe=True,
        )
        live = sorted(item.decode() for item in raw)
        self._live = max(1, len(live))
        return live

    def last_seen_live(self) -> int:
        return self._live

    async def publish_checkpoint(self, instance: str, checkpoint: WitnessedCheckpoint) -> None:
        body = json.dumps(asdict(checkpoint), sort_keys=True)
        await self._conn.run(lambda: self._conn.client.hset(CHECKPOINTS_KEY, instance, body))

    async def checkpoints(self) -> dict[str, WitnessedCheckpoint]:
        raw = await self._conn.run(lambda: self._conn.client.hgetall(CHECKPOINTS_KEY))
        found: dict[str, WitnessedCheckpoint] = {}
        for instance, body in raw.items():
            try:
                found[instance.decode()] = WitnessedCheckpoint(**json.loads(body))
            except (ValueError, TypeError):
                log.warning("ignored a malformed checkpoint entry in the store")
        return found
