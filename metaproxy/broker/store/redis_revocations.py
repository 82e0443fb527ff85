"""Revocations in the store: a durable hash, and a pub/sub push of every change."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import Revocation, RevocationEvent, RevocationListener
from metaproxy.broker.store.redis_keys import REVOCATION_CHANNEL, REVOCATIONS_KEY, revocation_field
from metaproxy.broker.store.redis_link import StoreLink

log = logging.getLogger("metaproxy.broker.store")


class RedisRevocations:
    def __init__(self, conn: StoreLink) -> None:
        self._conn = conn
        self._listeners: list[RevocationListener] = []
        self._lift = conn.script(scripts.LIFT)

    async def add(self, revocation: Revocation) -> None:
        body = json.dumps(asdict(revocation), sort_keys=True)
        field = revocation_field(revocation.tenant, revocation.task)
        message = json.dumps({"action": "revoke", "revocation": asdict(revocation)})

        async def write() -> None:
            # HSET first: durable in the store (AOF) before any replica hears of it, so a
            # replica that misses the push finds it at its next resync.
            await self._conn.client.hset(REVOCATIONS_KEY, field, body)
            await self._conn.client.publish(REVOCATION_CHANNEL, message)

        await self._conn.run(write)

    async def remove(self, tenant: str, task: str) -> Revocation | None:
        field = revocation_field(tenant, task)
        raw = await self._conn.run(
            lambda: self._lift(keys=[REVOCATIONS_KEY], args=[field, REVOCATION_CHANNEL])
        )
        return _revocation(raw) if raw else None

    async def snapshot(self) -> list[Revocation]:
        raw = await self._conn.run(lambda: self._conn.client.hgetall(REVOCATIONS_KEY), probe=True)
        entries = []
        for value in raw.values():
            entry = _revocation(value)
            if entry is not None:
                entries.append(entry)
        return entries

    def subscribe(self, listener: RevocationListener) -> None:
        self._listeners.append(listener)

    def deliver(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            action = message["action"]
            entry = Revocation(**message["revocation"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed revocation message")
            return
        if action not in ("revoke", "lift"):
            return
        for listener in self._listeners:
            listener(RevocationEvent(action, entry))


def _revocation(raw: bytes | str) -> Revocation | None:
    try:
        return Revocation(**json.loads(raw))
    except (ValueError, TypeError):
        log.warning("ignored a malformed revocation in the store")
        return None
