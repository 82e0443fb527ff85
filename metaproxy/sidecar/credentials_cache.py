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
- It stops serving once its credentials cannot be refreshed, because the broker refuses the
  task's identity (401) or the token file's token has expired, for longer than
  `revocation_max_staleness` since the broker's last answer: a task the broker cannot check
  could be revoked unseen. (A broker merely unreachable, with a valid token, is an outage, not
  a verdict: what is held stays served until it nears expiry.)
- It says why it has no credentials (`problem`, one line, logged once per change) and whether
  its loop can make progress at all (`health`): /readyz and /healthz read these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable

from metaproxy.clock import Clock
from metaproxy.sidecar import diagnosis
from metaproxy.sidecar.broker_client import BrokerClient, BrokerError, Grant
from metaproxy.sidecar.config import SidecarConfig

log = logging.getLogger("metaproxy.sidecar.credentials")

MAX_BACKOFF = 30.0
# A refresh is asked this long before the 15-minute window opens, so the broker's answer (one
# STS call at worst, bounded by the broker timeout) arrives while the old set is still servable.
WINDOW_MARGIN = 60.0
JITTER = 0.1  # ±10%: tasks started by one deployment spread their refreshes
# Every request asks how long the credentials have left. The wall clock is read at most this
# often (a `datetime` per request was a visible share of a cached answer); in between, the
# monotonic clock counts down from the last reading. A wall-clock step shows within this long.
WALL_CLOCK_SECONDS = 0.5


def refresh_delay(
    lifetime: float, left: float, *, refresh_fraction: float, min_serve: float, jitter: float
) -> float:
    """Seconds until the next refresh of credentials with `lifetime` seconds in all and `left`
    seconds to go: at `refresh_fraction` of the lifetime scaled by `jitter` (1 ± JITTER), and
    never later than WINDOW_MARGIN before `min_serve` remains. The jitter goes inside that
    bound: applied after it, +10% of a long delay overshot into the 15-minute window."""
    age = lifetime - left
    at_fraction = (lifetime * refresh_fraction - age) * jitter
    before_window = left - min_serve - WINDOW_MARGIN
    return max(1.0, min(at_fraction, before_window))


def retry_delay(retry_after: float | None, backoff: float) -> float:
    """How long to wait after a failed fetch: the broker's Retry-After plus up to a second of
    jitter (the header has whole seconds; the broker spreads refused callers across seconds,
    the jitter spreads them within one), or else full-jitter backoff."""
    if retry_after:
        return retry_after + uniform(0.0, 1.0)
    return uniform(0.0, backoff)


def uniform(low: float, high: float) -> float:
    """A jitter between `low` and `high`, like `random.uniform`, from `os.urandom`: the `random`
    module (the Mersenne Twister, `bisect`, a SHA-512) would be a tenth of a megabyte of every
    pod for a few jitters an hour (issue 13)."""
    return low + (high - low) * int.from_bytes(os.urandom(7), "big") / (1 << 56)


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
        self._monotonic = self.monotonic = clock.monotonic  # bound once: read on every request
        self._on_grant = on_grant
        self._grant: Grant | None = None
        self._read_at = float("-inf")  # monotonic time of the last wall-clock reading
        self._left_then = 0.0  # the grant's seconds left at that reading
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self.last_error: str = ""
        self.error: BrokerError | None = None  # the last fetch's failure; None after a success
        self.problem = diagnosis.WAITING  # one line: why there are no credentials (or "")
        self._broker = str(config.broker_socket or config.broker_url)
        self._last_attempt = float("-inf")
        self._answered_at = float("-inf")  # monotonic: the broker's last 200
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="credential-keeper")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def health(self) -> str:
        """ "" when the refresh loop runs and can make progress; else why not, in one line."""
        task = self._task
        if task is not None and task.done():
            failure = None if task.cancelled() else task.exception()
            return f"credential refresh loop stopped: {failure!r}"
        if self.error is not None and self.error.blocks_refresh:
            return self.problem
        return ""

    def _left(self, grant: Grant) -> float:
        """Seconds until `grant` expires (negative past it)."""
        now = self._monotonic()
        if now - self._read_at >= WALL_CLOCK_SECONDS:
            self._read_at = now
            self._left_then = grant.credentials.seconds_left(self._clock.now())
        return self._left_then - (now - self._read_at)

    def current(self) -> Grant | None:
        """The grant if its credentials have not expired; never anything expired."""
        grant = self._grant
        if grant is None:
            return None
        # `_left`, inlined: every request asks.
        now = self._monotonic()
        if now - self._read_at >= WALL_CLOCK_SECONDS:
            return grant if self._left(grant) > 0 else None
        return grant if self._left_then - (now - self._read_at) > 0 else None

    def seconds_left(self) -> float:
        grant = self._grant
        left = self._left(grant) if grant is not None else 0.0
        return left if left > 0 else 0.0

    def serving(self) -> Grant | None:
        """The grant if it may be handed out as it is: valid, with 15 minutes or more left."""
        grant = self._grant
        if grant is None:
            return None
        # `_left`, inlined: every request for credentials asks.
        now = self._monotonic()
        if now - self._read_at >= WALL_CLOCK_SECONDS:
            left = self._left(grant)
        else:
            left = self._left_then - (now - self._read_at)
        return grant if left >= self._config.min_serve_seconds else None

    def serving_until(self) -> tuple[Grant | None, float]:
        """`serving()`, and until when (`monotonic()`, exclusive) it will return that grant
        without another look at the wall clock (-inf when it returns none): an answer made
        from it stands that long (`imds.handle`'s repeats)."""
        grant = self.serving()
        if grant is None:
            return None, -math.inf
        read_at = self._read_at
        until = read_at + self._left_then - self._config.min_serve_seconds
        return grant, min(until, read_at + WALL_CLOCK_SECONDS)

    @property
    def grant(self) -> Grant | None:
        """The grant held, whether or not it may still be served."""
        return self._grant

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
        return refresh_delay(
            (grant.credentials.expiration - grant.issued_at).total_seconds(),
            grant.credentials.seconds_left(self._clock.now()),
            refresh_fraction=self._config.refresh_fraction,
            min_serve=self._config.min_serve_seconds,
            jitter=uniform(1 - JITTER, 1 + JITTER),
        )

    def next_check_delay(self, grant: Grant) -> float:
        """The next refresh, or sooner the next revocation check."""
        check = self._config.revocation_check_seconds
        refresh = self.next_refresh_delay(grant)
        return min(refresh, check) if check > 0 else refresh

    async def run(self) -> None:
        try:
            await self._refresh_forever()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Only a bug gets here (every expected failure is a BrokerError): say so loudly;
            # /healthz now fails and the platform restarts the sidecar.
            log.exception("credential refresh loop stopped")
            raise

    async def _refresh_forever(self) -> None:
        backoff = 1.0
        while True:
            self._last_attempt = self._clock.monotonic()
            try:
                grant = await self._client.fetch(refresh=self._grant is not None)
            except BrokerError as exc:
                self.failures += 1
                self.last_error = f"{exc.status} {exc.code}"
                self._failed(exc)
                if exc.revoked_or_denied or self._unrefreshable_too_long(exc):
                    await self._set(None)
                delay = retry_delay(exc.retry_after, backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                if self._grant is not None and self.current() is None:
                    await self._set(None)  # expired while the broker was away
                await self._sleep(min(delay, self._until_expiry_or(delay), self._until_stale()))
                continue
            backoff = 1.0
            self._answered_at = self._clock.monotonic()
            self.refreshes += 1
            self.last_error = ""
            if self.error is not None:
                log.info("credentials from the broker again (was: %s)", self.problem)
            self.error = None
            self.problem = ""
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

    def _failed(self, error: BrokerError) -> None:
        """Remember why, and log it in one line — once per new reason, not once per retry."""
        line = diagnosis.describe(error, self._broker)
        self.error = error
        if line == self.problem:
            log.debug("credential refresh failed again: %s", line)
            return
        self.problem = line
        if error.revoked_or_denied:
            log.warning("%s; dropping credentials", line)
        elif self._grant is not None and self.current() is not None:
            log.warning("credential refresh failed, serving cached credentials: %s", line)
        else:
            log.warning("not ready: %s", line)

    def _unrefreshable_too_long(self, error: BrokerError) -> bool:
        if self._grant is None:
            return False
        identity = self._client.identity
        expired = identity is not None and identity.expired_line(self._clock.now()) != ""
        if error.status != 401 and not expired:
            return False
        unchecked = self._clock.monotonic() - self._answered_at
        if unchecked <= self._config.revocation_max_staleness:
            return False
        log.warning(
            "credentials not refreshed for %.0fs (identity %s), past "
            "--revocation-max-staleness: no longer serving them (%s)",
            unchecked,
            "expired" if expired else "refused",
            self.problem,
        )
        return True

    def _until_stale(self) -> float:
        """Seconds until the credentials held would be dropped as unrefreshable (the token
        expired and the staleness limit passed), so a backoff does not sleep past it."""
        identity = self._client.identity
        left = identity.left(self._clock.now()) if identity is not None else None
        if self._grant is None or left is None:
            return math.inf
        unchecked = self._clock.monotonic() - self._answered_at
        return max(0.05, left, self._config.revocation_max_staleness - unchecked + 0.05)

    def _until_expiry_or(self, default: float) -> float:
        left = self.seconds_left()
        return left if left > 0 else default

    async def _set(self, grant: Grant | None) -> None:
        self._grant = grant
        self._read_at = float("-inf")  # a new grant: read the wall clock on the next question
        if self._on_grant is not None:
            self._on_grant(grant)
        async with self._changed:
            self._changed.notify_all()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, seconds))
