"""Moves a broker's Prometheus metrics (`BrokerMetrics`, metrics.py) as requests pass through.

Two kinds of hooks, so the code that decides never has to know about Prometheus:
- `request_metrics`, an aiohttp middleware inside `json_errors`: it sees the raw error class of
  every refused request (the reason label) and where the answer came from, which the handler
  notes on the request from the issuer's answer (`note_origin`). Both find the broker's metrics
  on the app (`METRICS`).
- `TimedAuditLog`, `TimedSts` and `CountedPolicyStore`: wrappers of the audit sink, the STS
  client and the policy store that time or count each call, through the parts' public methods.

The figures the broker's parts keep (queue, workers, STS results, circuits, the fleet) are not
moved here: `/metrics` reads them when scraped (figures.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiohttp import web

from metaproxy.broker.audit_trail import AuditSink
from metaproxy.broker.credentials.regions import RegionalSts
from metaproxy.broker.credentials.sts import AssumedRole, OnSent, StsClient
from metaproxy.broker.metrics import BrokerMetrics
from metaproxy.errors import (
    AuditUnavailable,
    BadRequest,
    Denied,
    MetaproxyError,
    Overloaded,
    RevocationsStale,
    TooManyRequests,
    Unauthenticated,
)
from metaproxy.logs import tenant_var
from metaproxy.models import AssumeRoleSpec, Credentials
from metaproxy.net.httperrors import Handler
from metaproxy.policy.load import PolicyProblem, PolicySnapshot
from metaproxy.policy.model import PolicySet
from metaproxy.policy.store import Fingerprint, PolicyStore

log = logging.getLogger("metaproxy.broker.metrics")

UNKNOWN_TENANT = "unknown"  # the caller was refused before a tenant was known (e.g. 401)

# Errors that mean "refused before reaching STS", and the reason label each gets.
# STS failures (StsUnavailable, UpstreamError) are not rejections: the STS counters show them.
REJECTION_REASONS: tuple[tuple[type[MetaproxyError], str], ...] = (
    (BadRequest, "bad_request"),
    (Unauthenticated, "unauthenticated"),
    (Denied, "denied"),
    (TooManyRequests, "rate_limited"),
    (Overloaded, "overloaded"),
    (AuditUnavailable, "audit_unavailable"),
    (RevocationsStale, "revocations_stale"),
)

# The broker's metrics, on each app whose requests move them.
METRICS = web.AppKey("metrics", BrokerMetrics)
# Where the credentials of an answered request came from (`Fetched.origin`), on the request.
_ORIGIN = web.RequestKey("origin", str)


def note_origin(request: web.Request, origin: str) -> None:
    """Called by the handler with its answer's origin, for `request_metrics` to read."""
    request[_ORIGIN] = origin
    metrics = request.app[METRICS]
    if origin in ("cache", "stale"):
        metrics.cache_hits.inc()
    elif origin == "coalesced":
        metrics.coalesced.inc()


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
    metrics = request.app[METRICS]
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except MetaproxyError as exc:
        status = exc.status
        reason = next((r for kind, r in REJECTION_REASONS if isinstance(exc, kind)), None)
        if reason is not None:
            metrics.rejections.labels(tenant=_tenant(), reason=reason).inc()
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        tenant = _tenant()
        metrics.requests.labels(tenant=tenant, status=str(status)).inc()
        metrics.request_seconds.labels(outcome=_outcome(status, request.get(_ORIGIN, ""))).observe(
            time.perf_counter() - started
        )
        if status == 200:
            metrics.issued.labels(tenant=tenant).inc()


def _tenant() -> str:
    # The tenant comes from the policy that matched the verified identity, never from the
    # request, so the label's values are bounded by the number of policy files.
    return tenant_var.get() or UNKNOWN_TENANT


class TimedAuditLog:
    """An audit sink (the chain's writer) with each append timed and each refused append
    counted."""

    def __init__(self, inner: AuditSink, metrics: BrokerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def append(self, record: Mapping[str, object]) -> dict[str, object]:
        started = time.perf_counter()
        try:
            return await self._inner.append(record)
        except AuditUnavailable:
            self._metrics.audit_failures.inc()
            raise
        finally:
            self._metrics.audit_write_seconds.observe(time.perf_counter() - started)


class TimedSts:
    """An `StsClient` that times every AssumeRole attempt (the caller counts them)."""

    def __init__(self, inner: StsClient, metrics: BrokerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

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
            self._metrics.sts_seconds.observe(time.perf_counter() - started)
        if role.packed_policy_size is not None:
            self._metrics.packed_policy_percent.observe(role.packed_policy_size)
        return role

    async def aclose(self) -> None:
        await self._inner.aclose()


def timed_regions(sts: StsClient, metrics: BrokerMetrics) -> RegionalSts:
    """Each region's client timed (a bare client is one region)."""
    return RegionalSts(
        (name, TimedSts(client, metrics)) for name, client in RegionalSts.of(sts).regions
    )


class CountedPolicyStore:
    """The policy store, with reloads (its watcher's or SIGHUP's) counted by result."""

    def __init__(self, inner: PolicyStore, metrics: BrokerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @property
    def current(self) -> PolicySet:
        return self._inner.current

    @property
    def generation(self) -> int:
        return self._inner.generation

    def reload(
        self, snapshot: PolicySnapshot | None = None, fingerprint: Fingerprint | None = None
    ) -> list[PolicyProblem]:
        problems = self._inner.reload(snapshot, fingerprint)
        self._metrics.policy_reloads.labels(result="error" if problems else "ok").inc()
        return problems

    async def watch(self, interval: float) -> None:
        """`PolicyStore.watch`, with its reloads counted: poll for changes and reload once the
        whole set is stable; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if not self._inner.changed():
                continue
            try:
                stable = await self._inner.settled(interval)
                if stable is not None:
                    await asyncio.to_thread(self.reload, *stable)
            except Exception:
                # A watcher that dies silently would freeze policy at its last state forever.
                log.exception("policy reload failed; keeping digest %s", self.current.digest)
