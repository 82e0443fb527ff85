"""Keeps the task's credentials fresh and decides what may be served.

- Refreshes at about half of the credentials' lifetime, with jitter so a fleet started together
  does not refresh together, and never later than `min_serve_seconds` before expiry (botocore
  and the JS SDK treat less than 15 minutes as "about to expire" and would hammer us).
- While the broker or STS is down it keeps serving what it has, retrying with backoff.
- It never serves expired credentials: past expiry it has nothing to serve.
- A 403 from the broker (denied or revoked) drops the cached credentials at once.
- It asks the broker at least every `revocation_check_seconds` (the broker answers a warm
  refresh from its cache, without STS), so a revoked task stops being served within that
  interval plus one broker round trip (see docs/revocation.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from metaproxy.clock import Clock
from metaproxy.config import SidecarConfig
from metaproxy.sidecar.broker_client import BrokerClient, BrokerError, Grant

log = logging.getLogger("metaproxy.sidecar.credentials")

MAX_BACKOFF = 30.0


def retry_delay(retry_after: float | None, backoff: float) -> float:
    """How long to wait after a failed fetch: the broker's Retry-After plus up to a second of
    jitter (the header has whole seconds; the broker spreads refused callers across seconds,
    the jitter spreads them within one), or else full-jitter backoff."""
    if retry_after:
        return retry_after + random.uniform(0.0, 1.0)  # noqa: S311 - jitter, not crypto
    return random.uniform(0.0, backoff)  # noqa: S311 - jitter, not crypto


class CredentialKeeper:
    def __init__(
        self,
        client: BrokerClient,
        config: SidecarConfig,
        clock: Clock,
        on_grant: Callable[[Grant | None], None] | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._clock = clock
        self._on_grant = on_grant
        self._grant: Grant | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self.last_error: str = ""
        self._last_attempt = float("-inf")
        self.refreshes = 0
        self.failures = 0

    def current(self) -> Grant | None:
        """The grant if its credentials have not expired; never anything expired."""
        grant = self._grant
        if grant is None:
            return None
        if grant.credentials.seconds_left(self._clock.now()) <= 0:
            return None
        return grant

    def seconds_left(self) -> float:
        grant = self.current()
        return grant.credentials.seconds_left(self._clock.now()) if grant else 0.0

    def serving(self) -> Grant | None:
        """The grant if it may be handed out as it is: valid, with 15 minutes or more left."""
        grant = self._grant
        if grant is None:
            return None
        if grant.credentials.seconds_left(self._clock.now()) < self._config.min_serve_seconds:
            return None
        return grant

    async def fresh(self, wait: float) -> Grant | None:
        """The grant to serve now. If it is inside the 15-minute window, ask for a refresh and
        wait briefly for it (SDK timeouts are ~1 s); if the broker is down, serve what is valid."""
        grant = self.current()
        if grant is not None and self.seconds_left() >= self._config.min_serve_seconds:
            return grant
        # A client looping while the broker is down must not turn into a broker flood.
        if self._clock.monotonic() - self._last_attempt >= 1.0:
            self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), self._changed:
                await self._changed.wait_for(
                    lambda: self.seconds_left() >= self._config.min_serve_seconds
                )
        return self.current()

    def next_refresh_delay(self, grant: Grant) -> float:
        now = self._clock.now()
        lifetime = (grant.credentials.expiration - grant.issued_at).total_seconds()
        left = grant.credentials.seconds_left(now)
        age = lifetime - left
        at_fraction = lifetime * self._config.refresh_fraction - age
        before_window = left - self._config.min_serve_seconds - 60
        delay = max(1.0, min(at_fraction, before_window))
        # ±10% jitter: tasks started by one deployment spread their refreshes.
        return delay * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not crypto

    def next_check_delay(self, grant: Grant) -> float:
        """The next refresh, or sooner the next revocation check."""
        check = self._config.revocation_check_seconds
        refresh = self.next_refresh_delay(grant)
        return min(refresh, check) if check > 0 else refresh

    async def run(self) -> None:
        backoff = 1.0
        while True:
            self._last_attempt = self._clock.monotonic()
            try:
                grant = await self._client.fetch(refresh=self._grant is not None)
            except BrokerError as exc:
                self.failures += 1
                self.last_error = f"{exc.status} {exc.code}"
                if exc.revoked_or_denied:
                    log.warning("broker refused this task (%s); dropping credentials", exc.code)
                    await self._set(None)
                else:
                    log.warning("credential refresh failed: %s", exc)
                delay = retry_delay(exc.retry_after, backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                if self._grant is not None and self.current() is None:
                    await self._set(None)  # expired while the broker was away
                await self._sleep(min(delay, self._until_expiry_or(delay)))
                continue
            backoff = 1.0
            self.refreshes += 1
            self.last_error = ""
            previous = self._grant
            await self._set(grant)
            # A revocation check usually gets the broker's cached set back: not news.
            unchanged = previous is not None and previous.credentials == grant.credentials
            log.log(
                logging.DEBUG if unchanged else logging.INFO,
                "credentials for %s refreshed (key %s, %.0fs left)",
                grant.role_name,
                grant.credentials.access_key_id,
                grant.credentials.seconds_left(self._clock.now()),
            )
            await self._sleep(self.next_check_delay(grant))

    def _until_expiry_or(self, default: float) -> float:
        left = self.seconds_left()
        return left if left > 0 else default

    async def _set(self, grant: Grant | None) -> None:
        self._grant = grant
        if self._on_grant is not None:
            self._on_grant(grant)
        async with self._changed:
            self._changed.notify_all()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, seconds))
