"""Records the sidecar's Prometheus metrics (defined in `metrics.py`).

- `count_request`: every answer of every listener (data plane and admin), counted and timed,
  rate-limit refusals included.
- `TimedBrokerClient`: the broker client with each fetch timed and counted ok/error.
- `GrantObserver`: the credential keeper's `on_grant` hook; it keeps the ready and remaining
  gauges current and observes the start-up time once, when the first credentials arrive.
- `refresh_gauges`: called by `/metrics` before it renders, for values that are cheapest to
  read at scrape time (seconds left, open file descriptors, open connections).

This module imports the sidecar's metrics only: never the broker's (its gauges would be
exported by every sidecar) and never boto3.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from metaproxy.clock import Clock
from metaproxy.sidecar import metrics
from metaproxy.sidecar.broker_client import BrokerClient, BrokerError, Grant
from metaproxy.sidecar.credentials_cache import CredentialKeeper

log = logging.getLogger("metaproxy.sidecar.metrics")

PROC_FD = Path("/proc/self/fd")


# Labelled children looked up once: `labels()` is the costly part of counting on the hot path.
_request_counters: dict[tuple[str, int], Callable[[], None]] = {}
_request_timers: dict[str, Callable[[float], None]] = {}


def count_request(path_class: str, status: int, started: float) -> None:
    """Count and time one data-plane answer (the data plane has no middleware chain)."""
    count = _request_counters.get((path_class, status))
    if count is None:
        count = metrics.REQUESTS.labels(path_class=path_class, status=str(status)).inc
        _request_counters[(path_class, status)] = count
    count()
    observe = _request_timers.get(path_class)
    if observe is None:
        observe = metrics.REQUEST_SECONDS.labels(path_class=path_class).observe
        _request_timers[path_class] = observe
    observe(time.perf_counter() - started)
    if status == 429:  # on the data plane only the per-client rate limiter answers 429
        metrics.REJECTED.labels(reason="rate_limited").inc()


async def counted(pending: Awaitable[Any], path_class: str, started: float) -> Any:
    """`count_request` for an answer that had to wait (a refresh, the host's IMDS)."""
    status = 500
    try:
        answer = await pending
        status = answer.status
        return answer
    finally:
        count_request(path_class, status, started)


def count_rejection(reason: str) -> None:
    """metaproxy_sidecar_rejected_total for what the HTTP layer refuses itself."""
    if reason in ("header_timeout", "body_timeout", "bad_request"):
        metrics.REJECTED.labels(reason=reason).inc()


class TimedBrokerClient(BrokerClient):
    """The broker client, with every credentials request timed and counted by result."""

    async def fetch(self, *, refresh: bool) -> Grant:
        started = time.perf_counter()
        try:
            grant = await super().fetch(refresh=refresh)
        except BrokerError:
            metrics.REFRESHES.labels(result="error").inc()
            raise
        finally:
            metrics.BROKER_SECONDS.observe(time.perf_counter() - started)
        metrics.REFRESHES.labels(result="ok").inc()
        return grant


def process_age_seconds() -> float | None:
    """Seconds since this process started, from the kernel's own start time (Linux)."""
    try:
        # Field 22 of /proc/self/stat, counted after the parenthesised command name (which
        # may itself contain spaces), is the start time in clock ticks since boot.
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class GrantObserver:
    """`CredentialKeeper(on_grant=...)`: gauges follow the keeper's grant as it changes."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._started_monotonic = time.monotonic()
        self._startup_observed = False

    def __call__(self, grant: Grant | None) -> None:
        if grant is None:
            metrics.READY.set(0)
            metrics.CREDENTIALS_REMAINING.set(0)
            return
        metrics.CREDENTIALS_REMAINING.set(
            max(0.0, grant.credentials.seconds_left(self._clock.now()))
        )
        metrics.READY.set(1)
        if not self._startup_observed:
            self._startup_observed = True
            age = process_age_seconds()
            if age is None:  # no /proc: count from when the sidecar was built
                age = time.monotonic() - self._started_monotonic
            metrics.STARTUP_SECONDS.observe(age)


class ConnectionCounts(Protocol):
    """What the sidecar's connection guard knows (`metaproxy.connguard.ConnectionGuard`)."""

    @property
    def open(self) -> int: ...

    @property
    def cap(self) -> int: ...

    @property
    def fd_budget(self) -> int: ...


# The connection guards of whoever owns the listeners (the sidecar server), per keeper.
_connection_guards: weakref.WeakKeyDictionary[CredentialKeeper, tuple[ConnectionCounts, ...]] = (
    weakref.WeakKeyDictionary()
)


def count_connections_with(keeper: CredentialKeeper, *guards: ConnectionCounts) -> None:
    """Register the guards whose connections this sidecar counts (read at scrape time); the
    first one is the task-facing guard, whose cap and descriptor budget are exported."""
    _connection_guards[keeper] = guards


def open_fds() -> int | None:
    try:
        return len(os.listdir(PROC_FD))
    except OSError:
        return None


def refresh_gauges(keeper: CredentialKeeper, *, draining: bool) -> None:
    grant = keeper.current()
    metrics.CREDENTIALS_REMAINING.set(keeper.seconds_left())
    metrics.READY.set(1 if grant is not None and not draining else 0)
    fds = open_fds()
    if fds is not None:
        metrics.OPEN_FDS.set(fds)
    guards = _connection_guards.get(keeper)
    if guards:
        metrics.OPEN_CONNECTIONS.set(sum(guard.open for guard in guards))
        metrics.CONNECTION_CAP.set(guards[0].cap)
        metrics.FD_BUDGET.set(guards[0].fd_budget)


def exposition() -> tuple[bytes, str]:
    """The default registry in Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(), CONTENT_TYPE_LATEST
