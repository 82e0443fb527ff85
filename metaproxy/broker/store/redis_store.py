"""The fleet store on Valkey or Redis: every replica of the broker shares it.

Each part falls back on its own when the store does not answer (see docs/fleet.md): the budget
and the tenant limits to this replica's share (1 / the live replicas it last saw), the cache to
this replica's own, the revocation view to what it holds until it is too stale to trust.

A failed command marks the store down for `DOWN_SECONDS`: during that time calls fail at once
instead of each waiting out the connect timeout, and the background loops (heartbeat, revocation
resync) are the ones that notice it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Literal, TypeVar

from metaproxy.broker.store import redis_scripts as scripts
from metaproxy.broker.store.base import (
    Admission,
    Revocation,
    RevocationEvent,
    RevocationListener,
    StoreUnavailable,
    WitnessedCheckpoint,
)
from metaproxy.broker.store.memory import LocalBudget, LocalLimits, retry_after
from metaproxy.broker.store.redis_conn import StoreUrl, connect
from metaproxy.models import BrokerLimits

log = logging.getLogger("metaproxy.broker.store")

T = TypeVar("T")

PREFIX = "metaproxy"
REVOCATIONS_KEY = f"{PREFIX}:{{revocations}}"
REVOCATION_CHANNEL = f"{PREFIX}:revocations"
FLIGHT_CHANNEL = f"{PREFIX}:flights"
BUDGET_KEY = f"{PREFIX}:{{sts-budget}}"
REPLICAS_KEY = f"{PREFIX}:{{replicas}}:live"
CHECKPOINTS_KEY = f"{PREFIX}:{{replicas}}:checkpoints"
DOWN_SECONDS = 1.0
# An in-flight slot is given back when its request ends; if its replica dies first, the lease
# frees it. Longer than any request the broker lets run.
IN_FLIGHT_LEASE_SECONDS = 30.0
# Budget slots further ahead than this are not reserved (a worker scaled down while it waited
# would waste it): the caller waits a little and asks again.
MAX_RESERVE_AHEAD_SECONDS = 2.0
# Kept back for the time between a slot and STS's count of the call (the replica's event loop,
# its connection to STS, the network): more than a single broker's call window keeps, because
# the slots of several replicas interleave and each replica's lateness adds to the others'
# (a 3,000-task burst over three replicas measured 308/s at the fault proxy with 5% kept back).
BUDGET_MARGIN = 0.06
BUDGET_BURST_SHARE = 0.01  # calls that may go at once after a quiet spell, as a share of 1 s
# The budget falls back to this replica's share only once the store has been unreachable this
# long. A blip (a slow command under load) must not: the replica would spend its share on top
# of the other replicas' use of the whole budget. Until then its calls wait.
FALLBACK_AFTER_SECONDS = 2.0
# A budget slot woken up later than this is not used (a call sent late bunches with the calls
# on time after it). Late calls add at most this share of a second's rate to any one second at
# STS: with the margin and the burst tolerance, 0.94 + 0.04 + 0.01 of the budget (297 of 300),
# leaving room for the time between a slot and the call's arrival at STS.
LATE_SLOT_SECONDS = 0.04
# Commands in flight at once from one replica. redis-py's pool refuses a command past its
# connection cap (100 by default) with MaxConnectionsError instead of waiting; during a burst
# a replica has a thousand requests at the store at once, and each refusal marked a healthy
# store down (budget share, local limits, an STS call per replica). Past this they wait a turn.
MAX_COMMANDS_IN_FLIGHT = 64


def _tenant_key(tenant: str, part: str) -> str:
    # One hash tag per tenant: the admission script's three keys land in one Cluster slot.
    return f"{PREFIX}:{{tenant:{tenant}}}:{part}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _Connection:
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


class RedisRevocations:
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._listeners: list[RevocationListener] = []
        self._lift = conn.script(scripts.LIFT)

    async def add(self, revocation: Revocation) -> None:
        body = json.dumps(asdict(revocation), sort_keys=True)
        field = _field(revocation.tenant, revocation.task)
        message = json.dumps({"action": "revoke", "revocation": asdict(revocation)})

        async def write() -> None:
            # HSET first: durable in the store (AOF) before any replica hears of it, so a
            # replica that misses the push finds it at its next resync.
            await self._conn.client.hset(REVOCATIONS_KEY, field, body)
            await self._conn.client.publish(REVOCATION_CHANNEL, message)

        await self._conn.run(write)

    async def remove(self, tenant: str, task: str) -> Revocation | None:
        field = _field(tenant, task)
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


def _field(tenant: str, task: str) -> str:
    return json.dumps([tenant, task])


def _revocation(raw: bytes | str) -> Revocation | None:
    try:
        return Revocation(**json.loads(raw))
    except (ValueError, TypeError):
        log.warning("ignored a malformed revocation in the store")
        return None


class RedisBudget:
    """One GCRA timeline in the store for every replica's AssumeRole calls."""

    def __init__(self, conn: _Connection, registry: RedisRegistry, calls: float) -> None:
        self.calls_per_second = calls
        self._conn = conn
        self._registry = registry
        self._reserve = conn.script(scripts.RESERVE_BUDGET)
        rate = calls * (1 - BUDGET_MARGIN)
        self._interval_us = int(1_000_000 / rate)
        self._tolerance_us = int(max(1.0, calls * BUDGET_BURST_SHARE) * self._interval_us)
        self._fallback: LocalBudget | None = None
        self.fallback_calls = 0
        self.late_slots = 0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked_at = loop.time()
            try:
                wait_us = await self._conn.run(
                    lambda: self._reserve(
                        keys=[BUDGET_KEY],
                        args=[
                            self._interval_us,
                            self._tolerance_us,
                            int(MAX_RESERVE_AHEAD_SECONDS * 1_000_000),
                        ],
                    )
                )
            except StoreUnavailable:
                down_since = self._conn.down_since
                if down_since is not None and loop.time() - down_since < FALLBACK_AFTER_SECONDS:
                    await asyncio.sleep(0.1)
                    continue
                await self._local_share().acquire()
                self.fallback_calls += 1
                return
            wait = int(wait_us) / 1_000_000
            if wait >= 0:
                slot = asked_at + wait  # at the latest: the store reserved it after we asked
                await asyncio.sleep(max(0.0, slot - loop.time()))
                if loop.time() - slot <= LATE_SLOT_SECONDS:
                    return
                # The event loop was busy past our slot (and past the slots of the calls it
                # held up with ours). Sent now, they would all reach STS at once, on top of the
                # other replicas' calls on time: 346 calls in one second of a 300/s budget, at
                # the fault proxy. A late slot is let go; a fresh one comes after the others.
                self.late_slots += 1
                continue
            await asyncio.sleep(min(-wait - MAX_RESERVE_AHEAD_SECONDS, 0.25) + 0.01)

    def _local_share(self) -> LocalBudget:
        """Budget ÷ the live replicas last seen, never above: every replica that lost the store
        does the same, so together they stay within the budget."""
        share = self.calls_per_second / max(1, self._registry.last_seen_live())
        if self._fallback is None or self._fallback.calls_per_second != share:
            log.warning("STS budget from the store unavailable: using %.1f/s (a share)", share)
            self._fallback = LocalBudget(share)
        return self._fallback

    def stats(self) -> dict[str, float]:
        live = max(1, self._registry.last_seen_live())
        return {
            "budget_share_per_second": (
                self.calls_per_second if self._conn.up else self.calls_per_second / live
            ),
            "budget_fallback": 0.0 if self._conn.up else 1.0,
            "budget_fallback_calls": float(self.fallback_calls),
            "budget_late_slots": float(self.late_slots),
        }


class RedisLimits:
    def __init__(self, conn: _Connection, registry: RedisRegistry) -> None:
        self._conn = conn
        self._registry = registry
        self._admit = conn.script(scripts.ADMIT)
        self._local = LocalLimits()

    async def enter(self, tenant: str, subject: str, limits: BrokerLimits) -> Admission:
        ticket = secrets.token_hex(8)
        t_interval = 1_000_000 / limits.requests_per_second
        i_interval = 1_000_000 / limits.per_identity_rps
        try:
            code, wait_us = await self._conn.run(
                lambda: self._admit(
                    keys=[
                        _tenant_key(tenant, "rate"),
                        _tenant_key(tenant, "id:" + _digest(subject)),
                        _tenant_key(tenant, "in-flight"),
                    ],
                    args=[
                        int(t_interval),
                        int(t_interval * limits.burst),
                        int(i_interval),
                        int(i_interval * limits.per_identity_burst),
                        limits.max_in_flight,
                        ticket,
                        int(IN_FLIGHT_LEASE_SECONDS * 1_000_000),
                    ],
                )
            )
        except StoreUnavailable:
            share = 1 / max(1, self._registry.last_seen_live())
            admission = self._local.enter_now(tenant, subject, limits, share=share)
            if admission.admitted:
                return Admission(True, ticket="local:" + admission.ticket)
            return admission
        if int(code) == 0:
            return Admission(True, ticket=ticket)
        reason = {1: "tenant-rate", 2: "identity-rate"}.get(int(code), "in-flight")
        return Admission(False, reason, retry_after(int(wait_us) / 1_000_000))

    async def leave(self, tenant: str, ticket: str) -> None:
        if ticket.startswith("local:"):
            self._local.leave_now(tenant, ticket.removeprefix("local:"))
            return
        # If this fails the lease frees the slot (IN_FLIGHT_LEASE_SECONDS).
        with contextlib.suppress(StoreUnavailable):
            await self._conn.run(
                lambda: self._conn.client.zrem(_tenant_key(tenant, "in-flight"), ticket)
            )


class RedisCache:
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._get_or_claim = conn.script(scripts.GET_OR_CLAIM)
        self._fill = conn.script(scripts.FILL)
        self._extend = conn.script(scripts.EXTEND_LEASE)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def get_or_claim(
        self, key: str, holder: str, ttl_seconds: float, *, claim_if_present: bool = False
    ) -> tuple[bytes | None, bool]:
        value, taken = await self._conn.run(
            lambda: self._get_or_claim(
                keys=[_cache_key(key), _lease_key(key)],
                args=[holder, _ms(ttl_seconds), "1" if claim_if_present else "0"],
            )
        )
        return (value or None), bool(taken)

    async def fill(
        self,
        key: str,
        holder: str,
        value: bytes | None,
        ttl_seconds: float,
        owners: list[str],
    ) -> None:
        ttl_ms = _ms(ttl_seconds)

        async def write() -> None:
            # One round trip: the owners' index (other slots on a Cluster) rides in the same
            # pipeline as the script that stores the value and releases the lease. A Cluster
            # client runs no script in a pipeline, so there it is a second round trip.
            cluster = self._conn.url.topology == "cluster"
            pipe = self._conn.client.pipeline(transaction=False)
            if value is not None:
                for owner in owners:
                    pipe.sadd(_owner_key(owner), key)
                    # The index lives as long as the longest value in it could.
                    pipe.pexpire(_owner_key(owner), ttl_ms, gt=True)
                    pipe.pexpire(_owner_key(owner), ttl_ms, nx=True)
            fill = {
                "keys": [_cache_key(key), _lease_key(key)],
                "args": [holder, value or b"", ttl_ms, FLIGHT_CHANNEL, key],
            }
            if not cluster:
                # Queued in the pipeline (with the script loaded first if the store lacks it).
                await self._fill(**fill, client=pipe)
            await pipe.execute()
            if cluster:
                await self._fill(**fill)

        await self._conn.run(write)

    async def drop_owner(self, owner: str) -> int:
        async def drop() -> int:
            keys = await self._conn.client.smembers(_owner_key(owner))
            dropped = 0
            for key in keys:
                dropped += int(await self._conn.client.delete(_cache_key(key.decode())))
            await self._conn.client.delete(_owner_key(owner))
            return dropped

        return await self._conn.run(drop)

    async def extend(self, key: str, holder: str, ttl_seconds: float) -> bool:
        done = await self._conn.run(
            lambda: self._extend(keys=[_lease_key(key)], args=[holder, _ms(ttl_seconds)])
        )
        return bool(done)

    async def wait(self, key: str, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(seconds):
                await future
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(future)
                if not waiting:
                    del self._waiters[key]

    def deliver(self, data: bytes) -> None:
        for future in self._waiters.pop(data.decode(errors="replace"), []):
            if not future.done():
                future.set_result(None)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _cache_key(key: str) -> str:
    # Value and lease share a hash tag: one script touches both, on a Cluster too.
    return f"{PREFIX}:{{cache:{key}}}:value"


def _lease_key(key: str) -> str:
    return f"{PREFIX}:{{cache:{key}}}:lease"


def _owner_key(owner: str) -> str:
    return f"{PREFIX}:owner:{_digest(owner)}"


class RedisRegistry:
    def __init__(self, conn: _Connection) -> None:
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


class RedisStore:
    kind: Literal["memory", "redis"] = "redis"

    def __init__(self, url: StoreUrl, *, timeout: float) -> None:
        loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731
        self._conn = _Connection(url, timeout, loop_time)
        self.revocations = RedisRevocations(self._conn)
        self.replicas = RedisRegistry(self._conn)
        self.limits = RedisLimits(self._conn, self.replicas)
        self.cache = RedisCache(self._conn)
        self._listener: asyncio.Task[None] | None = None
        self.push_connected = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._conn.up

    def budget(self, calls_per_second: float) -> RedisBudget:
        return RedisBudget(self._conn, self.replicas, calls_per_second)

    async def start(self) -> None:
        """Connect and subscribe. A store that is down now is not fatal: the replica starts,
        stays unready until it has read the revocations, and the loops reconnect."""
        self._listener = asyncio.create_task(self._listen(), name="store-push")
        try:
            await self._conn.run(self._conn.client.ping, probe=True)
        except StoreUnavailable:
            log.warning("store %s unreachable at start; retrying", self._conn.url.redacted())
            return
        # Pushes sent before we subscribed are covered by the first snapshot, taken after this.
        try:
            async with asyncio.timeout(5.0):
                await self.push_connected.wait()
        except TimeoutError:
            log.warning("store push channel not connected yet; relying on resync")

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        backoff = 0.1
        while True:
            pubsub = self._conn.pubsub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL, FLIGHT_CHANNEL)
                self.push_connected.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        await pubsub.ping()  # a dead connection shows itself here
                        continue
                    self._dispatch(message)
            except (RedisError, OSError, TimeoutError) as exc:
                self.push_connected.clear()
                log.warning("store push channel lost (%s); reconnecting", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        data = message["data"]
        data = data if isinstance(data, bytes) else str(data).encode()
        if channel == REVOCATION_CHANNEL:
            self.revocations.deliver(data)
        elif channel == FLIGHT_CHANNEL:
            self.cache.deliver(data)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for client in (self._conn.client, self._conn.pubsub_client):
            with contextlib.suppress(Exception):
                await client.aclose()
