"""Records the sidecar's metrics (`SidecarMetrics`, one per sidecar, on its state).

- `count_request`: every answer of every listener (data plane and admin), counted and timed,
  rate-limit refusals included.
- `TimedBrokerClient`: the broker client with each fetch timed and counted ok/error.
- `GrantObserver`: the credential keeper's `on_grant` hook; it keeps the ready and remaining
  gauges current and observes the start-up time once, when the first credentials arrive.
- `refresh_gauges`: called by `/metrics` before it renders, for values that are cheapest to
  read at scrape time (seconds left, open file descriptors, open connections).

Never the broker's metrics (its gauges would be exported by every sidecar), never boto3.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaproxy.clock import Clock
from metaproxy.sidecar.broker_client import BrokerClient, BrokerError, Grant
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.metrics import SidecarMetrics

if TYPE_CHECKING:
    from metaproxy.sidecar.state import SidecarState

log = logging.getLogger("metaproxy.sidecar.metrics")

PROC_FD = Path("/proc/self/fd")


def count_request(
    metrics: SidecarMetrics,
    path_class: str,
    status: int,
    started: float,
    listener: str,
    *,
    requests: int = 1,
) -> None:
    """Count and time one answer, or the same answer to `requests` requests answered together
    (the data plane has no middleware chain)."""
    count, timing = metrics.answered(path_class, status, listener)
    count.value += requests
    timing.observe(time.perf_counter() - started, requests)


async def counted(
    metrics: SidecarMetrics,
    pending: Awaitable[Any],
    path_class: str,
    started: float,
    listener: str,
    *,
    requests: int = 1,
) -> Any:
    """`count_request` for an answer that had to wait (a refresh, the host's IMDS)."""
    status = 500
    try:
        answer = await pending
        status = answer.status
        return answer
    finally:
        count_request(metrics, path_class, status, started, listener, requests=requests)


def rejection_counter(metrics: SidecarMetrics) -> Callable[[str], None]:
    """metaproxy_sidecar_rejected_total for what the HTTP layer refuses itself."""
    rejected = metrics.rejected

    def count(reason: str) -> None:
        if reason in ("header_timeout", "body_timeout", "bad_request"):
            rejected.labels(reason).inc()

    return count


class TimedBrokerClient(BrokerClient):
    """The broker client, with every credentials request timed and counted by result."""

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        super().__init__(config)
        self._metrics = metrics

    async def fetch(self, *, refresh: bool) -> Grant:
        started = time.perf_counter()
        try:
            grant = await super().fetch(refresh=refresh)
        except BrokerError:
            self._metrics.refreshes.labels("error").inc()
            raise
        finally:
            self._metrics.broker_seconds.observe(time.perf_counter() - started)
        self._metrics.refreshes.labels("ok").inc()
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
    """`CredentialKeeper(on_grant=...)`: gauges follow the keeper's grant as it changes.
    `on_started` is called once, with the first credentials: start-up is over."""

    def __init__(
        self,
        clock: Clock,
        metrics: SidecarMetrics,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._on_started = on_started
        self._started_monotonic = time.monotonic()
        self._startup_observed = False

    def __call__(self, grant: Grant | None) -> None:
        metrics = self._metrics
        if grant is None:
            metrics.ready.set(0)
            metrics.credentials_remaining.set(0)
            return
        metrics.credentials_remaining.set(
            max(0.0, grant.credentials.seconds_left(self._clock.now()))
        )
        metrics.ready.set(1)
        if not self._startup_observed:
            self._startup_observed = True
            age = process_age_seconds()
            if age is None:  # no /proc: count from when the sidecar was built
                age = time.monotonic() - self._started_monotonic
            metrics.startup_seconds.observe(age)
            if self._on_started is not None:
                self._on_started()


def open_fds() -> int | None:
    try:
        return len(os.listdir(PROC_FD))
    except OSError:
        return None


def refresh_gauges(state: SidecarState) -> None:
    metrics, keeper = state.metrics, state.keeper
    grant = keeper.current()
    metrics.credentials_remaining.set(keeper.seconds_left())
    now = state.clock.now()
    identity = state.client.identity
    left = identity.left(now) if identity is not None else None
    expired = identity is not None and identity.expired_line(now) != ""
    metrics.ready.set(1 if grant is not None and not state.draining and not expired else 0)
    if identity is not None and left is not None:
        metrics.identity_remaining.labels(identity.task).value = left
    fds = open_fds()
    if fds is not None:
        metrics.open_fds.set(fds)
    if state.guards:
        metrics.open_connections.set(sum(guard.open for guard in state.guards))
        metrics.connection_cap.set(state.guards[0].cap)
        metrics.fd_budget.set(state.guards[0].fd_budget)
