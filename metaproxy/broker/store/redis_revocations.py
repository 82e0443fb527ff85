"""Revocations in the store: a durable hash, the lifts' tombstones, and a signed push of every
change.

Every stored value and every pushed message carries the fleet's signature (`signing`): a forged
`lift` from any client of the store, or a value planted in it, is refused, counted and reported,
never applied. A malformed one is skipped; it never stops the others from being read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import (
    Lift,
    Revocation,
    RevocationEvent,
    RevocationListener,
    RevocationSnapshot,
)
from metaproxy.broker.store.redis_keys import (
    LIFTS_KEY,
    REVOCATION_CHANNEL,
    REVOCATIONS_KEY,
    revocation_field,
)
from metaproxy.broker.store.redis_link import StoreLink
from metaproxy.broker.store.signing import RevocationSigner

log = logging.getLogger("metaproxy.broker.store")

_FIELDS = ("tenant", "task", "at", "by")


class RedisRevocations:
    def __init__(self, conn: StoreLink, signer: RevocationSigner) -> None:
        self._conn = conn
        self._signer = signer
        self._listeners: list[RevocationListener] = []
        self._lift = conn.script(scripts.LIFT)
        self.rejected = 0  # messages and stored values refused (malformed or unsigned)
        self.listener_errors = 0

    def _signed(self, kind: str, record: Revocation | Lift) -> dict[str, str]:
        body = asdict(record)
        return {**body, "sig": self._signer.sign(kind, body)}

    async def add(self, revocation: Revocation) -> None:
        body = json.dumps(self._signed("revoke", revocation), sort_keys=True)
        field = revocation_field(revocation.tenant, revocation.task)
        message = json.dumps({"action": "revoke", "record": json.loads(body)})

        async def write() -> None:
            # HSET first: durable in the store (AOF) before any replica hears of it, so a
            # replica that misses the push finds it at its next resync.
            await self._conn.client.hset(REVOCATIONS_KEY, field, body)
            await self._conn.client.publish(REVOCATION_CHANNEL, message)

        await self._conn.run(write)

    async def remove(self, lift: Lift) -> Revocation | None:
        field = revocation_field(lift.tenant, lift.task)
        tombstone = json.dumps(self._signed("lift", lift), sort_keys=True)
        message = json.dumps({"action": "lift", "record": json.loads(tombstone)})
        raw = await self._conn.run(
            lambda: self._lift(
                keys=[REVOCATIONS_KEY, LIFTS_KEY],
                args=[field, tombstone, REVOCATION_CHANNEL, message],
            )
        )
        return self._verified("revoke", raw, Revocation) if raw else None

    async def snapshot(self) -> RevocationSnapshot:
        async def read() -> list[dict[Any, Any]]:
            async with self._conn.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(REVOCATIONS_KEY)
                pipe.hgetall(LIFTS_KEY)
                answers: list[dict[Any, Any]] = await pipe.execute()
                return answers

        stored, tombstones = await self._conn.run(read, probe=True)
        before = self.rejected
        revocations = [
            entry
            for value in stored.values()
            if (entry := self._verified("revoke", value, Revocation)) is not None
        ]
        lifts = [
            lift
            for value in tombstones.values()
            if (lift := self._verified("lift", value, Lift)) is not None
        ]
        return RevocationSnapshot(
            revocations, {lift.key: lift for lift in lifts}, self.rejected - before
        )

    def subscribe(self, listener: RevocationListener) -> None:
        self._listeners.append(listener)

    def deliver(self, data: bytes) -> None:
        """A pushed message: applied only if the fleet signed it; never raises."""
        try:
            message = json.loads(data)
            action = message["action"]
            record = message["record"]
        except (ValueError, KeyError, TypeError):
            self._refuse("a malformed revocation message")
            return
        if action == "revoke":
            entry = self._verified("revoke", record, Revocation)
            event = RevocationEvent("revoke", entry) if entry is not None else None
        elif action == "lift":
            lift = self._verified("lift", record, Lift)
            event = (
                RevocationEvent("lift", Revocation(lift.tenant, lift.task, lift.at), lift)
                if lift is not None
                else None
            )
        else:
            event = None
            self._refuse(f"a revocation message with action {str(action)[:20]!r}")
        if event is None:
            return
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                # One listener's bug must not silence revocations for the others, or kill
                # the push channel's loop.
                self.listener_errors += 1
                log.exception("a revocation listener failed on %s", event.action)

    def _verified(self, kind: str, raw: object, cls: type[Any]) -> Any:
        """The record if it is well formed and signed by the fleet; else None, counted."""
        try:
            body: Any = json.loads(raw) if isinstance(raw, bytes | str) else raw
            record = {name: body[name] for name in _FIELDS}
            if not all(isinstance(value, str) for value in record.values()):
                raise TypeError("not text")
            signature = body.get("sig")
        except (ValueError, KeyError, TypeError, AttributeError):
            self._refuse(f"a malformed {kind} record")
            return None
        if not self._signer.verify(kind, record, signature):
            self._refuse(f"a {kind} record not signed by this fleet's key")
            return None
        return cls(**record)

    def _refuse(self, what: str) -> None:
        self.rejected += 1
        log.warning("revocations: refused %s (%d refused so far)", what, self.rejected)
