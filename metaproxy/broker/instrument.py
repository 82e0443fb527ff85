"""Records the broker's Prometheus metrics (defined in `metrics.py`) as requests pass through.

Three kinds of hooks, so the code that decides never has to know about Prometheus:
- `request_metrics`, an aiohttp middleware inside `json_errors`: it sees the raw error class of
  every refused request (the reason label) and where the answer came from, which the handler
  notes on the request from the issuer's answer (`note_origin`).
- `TimedAuditLog`, `TimedSts` and `CountedPolicyStore`: thin subclasses/wrappers of the audit
  writer, the STS client and the policy store that time or count each call.
- `ScrapeState.refresh`, called by `/metrics` before it renders: it reads the scheduler's
  `stats()` (queue depth per priority, workers, STS results, circuit) at scrape time, so the
  scheduler's internals can change without this module noticing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from metaproxy.audit.writer import AuditLog
from metaproxy.broker import metrics
from metaproxy.broker.credentials.regions import RegionalSts
from metaproxy.broker.credentials.sts import AssumedRole, OnSent, StsClient
from metaproxy.errors import AuditUnavailable, MetaproxyError
from metaproxy.logs import tenant_var
from metaproxy.models import AssumeRoleSpec, Credentials
from metaproxy.net.httperrors import Handler
from metaproxy.policy.load import PolicyProblem, PolicySnapshot
from metaproxy.policy.store import Fingerprint, PolicyStore

log = logging.getLogger("metaproxy.broker.metrics")

UNKNOWN_TENANT = "unknown"  # the caller was refused before a tenant was known (e.g. 401)

# Error codes that mean "refused before reaching STS", and the reason label each gets.
# STS failures (StsUnavailable, UpstreamError) are not rejections: the STS counters show them.
REJECTION_REASONS: Mapping[str, str] = {
    "BadRequest": "bad_request",
    "Unauthenticated": "unauthenticated",
    "AccessDenied": "denied",
    "TooManyRequests": "rate_limited",
    "Overloaded": "overloaded",
    "AuditUnavailable": "audit_unavailable",
    "RevocationsStale": "revocations_stale",
}

# Where the credentials of an answered request came from (`Fetched.origin`), on the request.
_ORIGIN = web.RequestKey("origin", str)


def note_origin(request: web.Request, origin: str) -> None:
    """Called by the handler with its answer's origin, for `request_metrics` to read."""
    request[_ORIGIN] = origin
    if origin in ("cache", "stale"):
        metrics.CACHE_HITS.inc()
    elif origin == "coalesced":
        metrics.COALESCED.inc()


def _outcome(status: int, origin: str) -> str:
    if status != 200:
        return "error"
    return "cached" if origin in ("cache", "stale") else "uncached"


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time credential requests by tenant, status and outcome (cached or not)."""
    # aiohttp serves a keep-alive connection's requests in one task: reset what the previous
    # request left in the context, or its tenant would be charged with this one.
    tenant_var.set("")
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except MetaproxyError as exc:
        status = exc.status
        reason = REJECTION_REASONS.get(exc.code)
        if reason is not None:
            metrics.REJECTIONS.labels(tenant=_tenant(), reason=reason).inc()
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        tenant = _tenant()
        metrics.REQUESTS.labels(tenant=tenant, status=str(status)).inc()
        metrics.REQUEST_SECONDS.labels(outcome=_outcome(status, request.get(_ORIGIN, ""))).observe(
            time.perf_counter() - started
        )
        if status == 200:
            metrics.ISSUED.labels(tenant=tenant).inc()


def _tenant() -> str:
    # The tenant comes from the policy that matched the verified identity, never from the
    # request, so the label's values are bounded by the number of policy files.
    return tenant_var.get() or UNKNOWN_TENANT


class TimedAuditLog(AuditLog):
    """The audit writer, with each append timed and each refused append counted."""

    async def append(self, record: Mapping[str, object]) -> dict[str, object]:
        started = time.perf_counter()
        try:
            return await super().append(record)
        except AuditUnavailable:
            metrics.AUDIT_FAILURES.inc()
            raise
        finally:
            metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - started)


class TimedSts:
    """An `StsClient` that times every AssumeRole attempt (the scheduler counts them)."""

    def __init__(self, inner: StsClient) -> None:
        self._inner = inner

    async def assume_role(
        self,
        spec: AssumeRoleSpec,
        *,
        signed_with: Credentials | None = None,
        on_sent: OnSent | None = None,
    ) -> AssumedRole:
        started = time.perf_counter()
        try:
            role = await self._inner.assume_role(spec, signed_with=signed_with, on_sent=on_sent)
        finally:
            metrics.STS_SECONDS.observe(time.perf_counter() - started)
        if role.packed_policy_size is not None:
            metrics.PACKED_POLICY_PERCENT.observe(role.packed_policy_size)
        return role

    async def aclose(self) -> None:
        await self._inner.aclose()


def timed_regions(sts: StsClient) -> RegionalSts:
    """Each region's client timed (a bare client is one region)."""
    return RegionalSts((name, TimedSts(client)) for name, client in RegionalSts.of(sts).regions)


class CountedPolicyStore(PolicyStore):
    """The policy store, with reloads (watcher or SIGHUP) counted by result."""

    def reload(
        self, snapshot: PolicySnapshot | None = None, fingerprint: Fingerprint | None = None
    ) -> list[PolicyProblem]:
        problems = super().reload(snapshot, fingerprint)
        metrics.POLICY_RELOADS.labels(result="error" if problems else "ok").inc()
        return problems


# Scheduler stats keys that feed the STS call counter, by result label. Timeouts are already
# counted in "errors"; "sts_refused" is STS answering no (e.g. the role does not trust us).
_STS_RESULTS: Mapping[str, tuple[str, ...]] = {
    "ok": ("sts_ok",),
    "throttled": ("throttles",),
    "error": ("errors", "sts_refused"),
}


class ScrapeState:
    """What one broker feeds into the metrics at scrape time.

    Counters can only go up, so the STS totals the scheduler keeps are added as the difference
    from the previous scrape of this broker (several brokers in one process add up correctly).
    """

    def __init__(
        self,
        stats: Callable[[], Mapping[str, float]],
        open_connections: Callable[[], int] | None = None,
        fleet: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self._stats = stats
        self.open_connections = open_connections
        self._fleet = fleet
        self._seen: dict[str, float] = dict.fromkeys(_STS_RESULTS, 0.0)
        self._shared_seen: dict[str, float] = {}
        self._region_seen: dict[str, float] = {}

    def refresh(self) -> None:
        try:
            stats: Mapping[str, Any] = self._stats()
        except Exception:
            # A metrics scrape must never fail the admin endpoint; the gauges just go stale.
            log.exception("scheduler stats unavailable")
            return
        for priority in ("cold", "refresh"):
            metrics.QUEUE_DEPTH.labels(priority=priority).set(
                float(stats.get(f"queue_{priority}", 0.0))
            )
        metrics.WORKERS.set(float(stats.get("workers", 0.0)))
        metrics.CIRCUIT_OPEN.set(float(stats.get("circuit_open", 0.0)))
        for result, keys in _STS_RESULTS.items():
            total = sum(float(stats.get(key, 0.0)) for key in keys)
            if total > self._seen[result]:
                metrics.STS_CALLS.labels(result=result).inc(total - self._seen[result])
            self._seen[result] = total
        if self.open_connections is not None:
            metrics.OPEN_CONNECTIONS.set(self.open_connections())
        metrics.BUDGET_SHARE.set(float(stats.get("budget_share_per_second", 0.0)))
        self._refresh_regions(stats)
        if self._fleet is not None:
            self._refresh_fleet(self._fleet())

    def _refresh_regions(self, stats: Mapping[str, Any]) -> None:
        """`circuit_state.REGION` and `sts_calls.REGION.RESULT` (scheduler stats, regions.py)."""
        for key, value in stats.items():
            if key.startswith("circuit_state."):
                region = key.removeprefix("circuit_state.")
                metrics.STS_REGION_CIRCUIT.labels(region=region).set(float(value))
            elif key.startswith("sts_calls."):
                region, _, result = key.removeprefix("sts_calls.").rpartition(".")
                seen = self._region_seen.get(key, 0.0)
                if float(value) > seen:
                    metrics.STS_REGION_CALLS.labels(region=region, result=result).inc(
                        float(value) - seen
                    )
                self._region_seen[key] = float(value)

    def _refresh_fleet(self, fleet: Mapping[str, float]) -> None:
        metrics.STORE_UP.set(fleet.get("store_up", 1.0))
        metrics.LIVE_REPLICAS.set(fleet.get("live_replicas", 1.0))
        # An unloaded view is infinitely old; a gauge shows that as a large number.
        metrics.REVOCATION_VIEW_AGE.set(min(fleet.get("revocation_view_age", 0.0), 1e9))
        for result in ("hit", "wait", "fallback"):
            total = fleet.get(f"shared_cache_{result}", 0.0)
            seen = self._shared_seen.get(result, 0.0)
            if total > seen:
                metrics.SHARED_CACHE.labels(result=result).inc(total - seen)
            self._shared_seen[result] = total
        for event in ("restored", "rejected", "error"):
            total = fleet.get(f"revocations_{event}", 0.0)
            seen = self._shared_seen.get(f"revocations_{event}", 0.0)
            if total > seen:
                metrics.REVOCATION_INTEGRITY.labels(event=event).inc(total - seen)
            self._shared_seen[f"revocations_{event}"] = total


def exposition() -> tuple[bytes, str]:
    """The default registry in Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(), CONTENT_TYPE_LATEST
