"""The keys of an issuer given by URL: fetched at start, on a schedule, and on an unknown `kid`.

Copying a cluster's keys into a file by hand turned every missed refresh before a key rotation
into an outage for every pod of that cluster at once. Fetched keys follow the issuer:

- every `refresh_seconds` the set is fetched again (sooner, every `RETRY_SECONDS` at most, while
  fetches fail), so a key published one period before it signs anything is known in time;
- a token naming a key the set lacks triggers a fetch at once, for issuers that sign with a key
  as soon as they publish it. At most one such fetch per `unknown_kid_interval`, however many
  unknown kids arrive: a flood of made-up kids costs the issuer one request per interval, and
  concurrent callers join the fetch in flight rather than start their own;
- a failed fetch (issuer unreachable, TLS refused, a document we refuse) keeps the last good set:
  an issuer's outage must not become ours. Its age and the failures are counted (`stats`), for
  the broker's `metaproxy_broker_jwks_age_seconds` and its alert.

A broker that cannot fetch an issuer's keys at start still starts (the other issuers' tasks are
served); that issuer's tokens are refused until a fetch succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from metaproxy.clock import Clock
from metaproxy.config import TrustedIssuer
from metaproxy.errors import MetaproxyError
from metaproxy.identity.keys import PublicKey, VerifyingAlgorithm
from metaproxy.identity.trusted_keys import KeySet, select_key

log = logging.getLogger("metaproxy.identity")

RETRY_SECONDS = 30.0  # while an issuer's fetches fail, try again this often at most


@dataclass(frozen=True, slots=True)
class Fetching:
    """How keys are fetched from issuers given by URL (the broker's `--jwks-*` flags)."""

    refresh_seconds: float = 300.0
    unknown_kid_interval: float = 10.0
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class KeySetStats:
    """One issuer's fetched key set, for /metrics."""

    issuer: str
    age: float  # seconds since the last good fetch; inf: never fetched
    keys: int
    fetches: int  # fetches that replaced the set
    failures: int  # fetches that failed (the last good set stayed in force)


class KeySource(Protocol):
    """Where the keys come from (`jwks_fetch.JwksClient`)."""

    async def keys(self, trust: TrustedIssuer) -> KeySet: ...


class RemoteKeys:
    def __init__(
        self, trust: TrustedIssuer, source: KeySource, clock: Clock, fetching: Fetching
    ) -> None:
        self.trust = trust
        self.keys: KeySet = {}
        self._source = source
        self._clock = clock
        self._fetching = fetching
        self._fetched_at: float | None = None  # monotonic, last good fetch
        self._kid_fetch_at = -math.inf  # monotonic, last fetch an unknown kid started
        self._inflight: asyncio.Task[bool] | None = None
        self._schedule: asyncio.Task[None] | None = None
        self.fetches = 0
        self.failures = 0
        self._failing = True  # the last fetch failed (or none ran): retry sooner

    async def start(self) -> None:
        """Fetch once (a failure is logged and retried), then keep the set fresh."""
        await self.fetch()
        self._schedule = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def aclose(self) -> None:
        for task in (self._schedule, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._schedule = self._inflight = None

    def refresh(self) -> None:
        """Nothing to re-read at verification time: the schedule keeps the set fresh."""

    def select(self, header: Mapping[str, Any]) -> tuple[PublicKey, VerifyingAlgorithm]:
        return select_key(self.keys, header, self.trust.issuer)

    async def fetch(self) -> bool:
        """Fetch the set now, or join the fetch in flight; True if it was replaced."""
        task = self._inflight
        if task is None:
            # Registered before any await, so concurrent callers find it and join.
            task = self._inflight = asyncio.create_task(self._fetch_once(), name="jwks-fetch")
            task.add_done_callback(self._fetch_done)
        # Shielded: one caller giving up (its client hung up) does not cancel the others'.
        return await asyncio.shield(task)

    async def fetch_for_unknown_kid(self) -> bool:
        """A token named a key we lack: fetch, unless one already did within the interval.
        True if a fetch (this one, or the one it joined) replaced the set."""
        if self._inflight is not None:
            return await self.fetch()
        now = self._clock.monotonic()
        if now - self._kid_fetch_at < self._fetching.unknown_kid_interval:
            return False
        self._kid_fetch_at = now
        return await self.fetch()

    def stats(self) -> KeySetStats:
        fetched = self._fetched_at
        age = math.inf if fetched is None else max(0.0, self._clock.monotonic() - fetched)
        return KeySetStats(self.trust.issuer, age, len(self.keys), self.fetches, self.failures)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_once(self) -> bool:
        try:
            keys = await asyncio.wait_for(
                self._source.keys(self.trust), self._fetching.timeout + 1.0
            )
        except Exception as exc:  # what an issuer sends must never fail a request (no 5xx)
            self.failures += 1
            self._failing = True
            detail = exc.detail if isinstance(exc, MetaproxyError) else type(exc).__name__
            kept = f"keeping the last good {len(self.keys)}" if self.keys else "no keys yet"
            log.warning("JWKS fetch for %s failed (%s): %s", self.trust.issuer, kept, detail)
            return False
        if keys.keys() != self.keys.keys():
            log.info("JWKS for %s now holds %d keys", self.trust.issuer, len(keys))
        self.keys = keys
        self._fetched_at = self._clock.monotonic()
        self.fetches += 1
        self._failing = False
        return True

    async def _refresh_forever(self) -> None:
        period = self._fetching.refresh_seconds
        while True:
            await asyncio.sleep(min(period, RETRY_SECONDS) if self._failing else period)
            await self.fetch()
