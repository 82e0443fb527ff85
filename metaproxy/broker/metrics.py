"""Prometheus metrics of the broker: their definitions, and one `BrokerMetrics` per broker.

Each broker has its own registry, so two brokers in one process (the tests, the demo) each
show only their own figures. Two kinds of metric:
- *moved* as things happen, by the hooks in `instrument.py`: requests, latencies, refusals,
  audit writes, STS attempt timings, policy reloads (`BrokerMetrics` attributes);
- *read* at scrape time from the figures the broker's parts keep anyway (queue, workers, STS
  results, circuits, the fleet): `figures.py`, whose counters are the parts' own totals.

Names, labels and help texts are what alerts (deploy/prometheus/alerts.yaml), the dashboard
and docs/slo.md query: tests/test_metrics_names.py checks them. `status` labels are HTTP status
codes as text ("200", "503"); `tenant` is the tenant's policy name (bounded by the number of
policy files, never a caller-supplied string).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector

from metaproxy.metric_names import Kind, sample_names

# Cached answers take about a millisecond; uncached ones wait for STS (hundreds of ms, seconds when
# throttled and retried).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A percentage; the alert fires at 80 (deploy/prometheus/alerts.yaml).
PACKED_POLICY_BUCKETS = (10.0, 25.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 100.0)
# Audit writes are synced; the broker refuses to issue when one exceeds audit_write_timeout
# (0.5 s by default).
AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric's definition: its name as queried (a counter's ends in `_total`), its help
    text, its kind and its label names."""

    name: str
    help: str
    kind: Kind
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def sample_names(self) -> set[str]:
        return sample_names(self.name, self.kind)


# Moved as things happen (instrument.py).
REQUESTS = Family(
    "metaproxy_broker_requests_total",
    "Credential requests answered, by tenant and HTTP status.",
    "counter",
    labels=("tenant", "status"),
)

REQUEST_SECONDS = Family(
    "metaproxy_broker_request_seconds",
    "Time to answer a credential request, by outcome (cached, uncached, error).",
    "histogram",
    labels=("outcome",),
    buckets=REQUEST_BUCKETS,
)

REJECTIONS = Family(
    "metaproxy_broker_rejections_total",
    "Requests refused before reaching STS, by tenant and reason.",
    "counter",
    labels=("tenant", "reason"),
)

ISSUED = Family(
    "metaproxy_broker_credentials_issued_total",
    "Credentials handed to a sidecar, by tenant.",
    "counter",
    labels=("tenant",),
)

CACHE_HITS = Family(
    "metaproxy_broker_cache_hits_total",
    "Credential requests answered from the broker's cache.",
    "counter",
)

COALESCED = Family(
    "metaproxy_broker_coalesced_total",
    "Credential requests that joined an STS call already in flight instead of making their own.",
    "counter",
)

STS_SECONDS = Family(
    "metaproxy_broker_sts_seconds",
    "Time of one STS AssumeRole attempt.",
    "histogram",
    buckets=STS_BUCKETS,
)

PACKED_POLICY_PERCENT = Family(
    "metaproxy_broker_sts_packed_policy_percent",
    "STS's PackedPolicySize of each AssumeRole: the session policy and tags as a percentage of "
    "what STS accepts (over 100 is refused with PackedPolicyTooLarge).",
    "histogram",
    buckets=PACKED_POLICY_BUCKETS,
)

AUDIT_WRITE_SECONDS = Family(
    "metaproxy_broker_audit_write_seconds",
    "Time to append (and sync) one audit record.",
    "histogram",
    buckets=AUDIT_BUCKETS,
)

AUDIT_FAILURES = Family(
    "metaproxy_broker_audit_failures_total",
    "Audit writes that failed or timed out; each one refused an issuance (fail closed).",
    "counter",
)

POLICY_RELOADS = Family(
    "metaproxy_broker_policy_reloads_total",
    "Policy reloads, by result (ok, error); on error the last good policy set stays in force.",
    "counter",
    labels=("result",),
)

# Read at scrape time from the broker's parts (figures.py).
QUEUE_DEPTH = Family(
    "metaproxy_broker_queue_depth",
    "Requests waiting for an STS worker, by priority (cold, refresh).",
    "gauge",
    labels=("priority",),
)

WORKERS = Family(
    "metaproxy_broker_workers",
    "STS workers currently running (the autoscaler moves this between its floor and ceiling).",
    "gauge",
)

OPEN_CONNECTIONS = Family(
    "metaproxy_broker_open_connections",
    "Client connections currently open to the broker.",
    "gauge",
)

STS_CALLS = Family(
    "metaproxy_broker_sts_calls_total",
    "STS AssumeRole attempts, by result (ok, throttled, error).",
    "counter",
    labels=("result",),
)

CIRCUIT_OPEN = Family(
    "metaproxy_broker_circuit_open",
    "1 while the STS circuit breaker is open (STS failing; only cached credentials served).",
    "gauge",
)

BUDGET_SHARE = Family(
    "metaproxy_broker_sts_budget_share_per_second",
    "AssumeRole calls per second this replica may make: the whole budget while the store "
    "answers, budget / live replicas while it does not.",
    "gauge",
)

STS_REGION_CALLS = Family(
    "metaproxy_broker_sts_region_calls_total",
    "STS AssumeRole attempts by region (--sts-regions) and result (ok, throttled, error).",
    "counter",
    labels=("region", "result"),
)

STS_REGION_CIRCUIT = Family(
    "metaproxy_broker_sts_region_circuit_state",
    "Each STS region's circuit: 0 closed, 1 half-open (probing), 2 open (calls go to the next "
    "region).",
    "gauge",
    labels=("region",),
)

STORE_UP = Family(
    "metaproxy_broker_store_up",
    "1 while the fleet store answered the last command (always 1 with the in-memory store).",
    "gauge",
)

LIVE_REPLICAS = Family(
    "metaproxy_broker_live_replicas",
    "Broker replicas live in the store's registry at this replica's last heartbeat.",
    "gauge",
)

REVOCATION_VIEW_AGE = Family(
    "metaproxy_broker_revocation_view_age_seconds",
    "Seconds since this replica's revocations last matched the store; past "
    "--revocation-max-staleness it refuses to issue.",
    "gauge",
)

REVOCATION_INTEGRITY = Family(
    "metaproxy_broker_revocation_integrity_events_total",
    "Revocations this replica had to defend: restored (the store came back without one it "
    "held and no lift covered it: kept in force and written back), rejected (a stored value or "
    "pushed message that was malformed or not signed with the fleet's key), error (a re-read "
    "or push that failed unexpectedly). Any of these warrants a look (alert "
    "MetaproxyRevocationIntegrity).",
    "counter",
    labels=("event",),
)

SHARED_CACHE = Family(
    "metaproxy_broker_shared_cache_total",
    "Fetches through the fleet's shared cache, by result (hit: another replica's set, wait: "
    "waited for another replica's call, fallback: the store did not answer).",
    "counter",
    labels=("result",),
)

JWKS_AGE = Family(
    "metaproxy_broker_jwks_age_seconds",
    "Seconds since the keys of an issuer given by URL were last fetched (1e9: never); the "
    "last good keys stay in force meanwhile.",
    "gauge",
    labels=("issuer",),
)

JWKS_FETCH_FAILURES = Family(
    "metaproxy_broker_jwks_fetch_failures_total",
    "Fetches of an issuer's keys that failed (unreachable, TLS, a refused document).",
    "counter",
    labels=("issuer",),
)

AUDIT_SUMMARISED = Family(
    "metaproxy_broker_audit_summarised_total",
    "Refusals answered without an audit record of their own, counted in their window's summary "
    "record instead (docs/audit.md): authentication and control-authentication (failed "
    "tokens, per peer), refusal (403 and 429 to a valid token, per task).",
    "counter",
    labels=("kind",),
)

AWS_ATTESTATIONS = Family(
    "metaproxy_broker_aws_attestations_total",
    "AWS attestations (signed GetCallerIdentity calls, docs/ecs.md), by result (ok, refused: a "
    "401 with its reason, unavailable: STS could not answer, a 503); reason is the refusal's "
    "category (expired, wrong_audience, malformed, invalid_claims, bad_signature, "
    "unknown_issuer, ...), empty unless refused.",
    "counter",
    labels=("result", "reason"),
)

MOVED: tuple[Family, ...] = (
    REQUESTS,
    REQUEST_SECONDS,
    REJECTIONS,
    ISSUED,
    CACHE_HITS,
    COALESCED,
    STS_SECONDS,
    PACKED_POLICY_PERCENT,
    AUDIT_WRITE_SECONDS,
    AUDIT_FAILURES,
    POLICY_RELOADS,
)
SCRAPED: tuple[Family, ...] = (
    QUEUE_DEPTH,
    WORKERS,
    OPEN_CONNECTIONS,
    STS_CALLS,
    CIRCUIT_OPEN,
    BUDGET_SHARE,
    STS_REGION_CALLS,
    STS_REGION_CIRCUIT,
    STORE_UP,
    LIVE_REPLICAS,
    REVOCATION_VIEW_AGE,
    REVOCATION_INTEGRITY,
    SHARED_CACHE,
    JWKS_AGE,
    JWKS_FETCH_FAILURES,
    AUDIT_SUMMARISED,
    AWS_ATTESTATIONS,
)
FAMILIES: tuple[Family, ...] = (*MOVED, *SCRAPED)


def exported_names() -> set[str]:
    """Every sample name the broker can expose; alerts and dashboards must use these."""
    return {name for family in FAMILIES for name in family.sample_names()}


class BrokerMetrics:
    """The metrics of one broker: the ones moved as things happen, as attributes, and the
    figures read at scrape time (`figures`, a collector: `figures.FiguresCollector`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, figures: Collector | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = _counter(REQUESTS, r)
        self.request_seconds = _histogram(REQUEST_SECONDS, r)
        self.rejections = _counter(REJECTIONS, r)
        self.issued = _counter(ISSUED, r)
        self.cache_hits = _counter(CACHE_HITS, r)
        self.coalesced = _counter(COALESCED, r)
        self.sts_seconds = _histogram(STS_SECONDS, r)
        self.packed_policy_percent = _histogram(PACKED_POLICY_PERCENT, r)
        self.audit_write_seconds = _histogram(AUDIT_WRITE_SECONDS, r)
        self.audit_failures = _counter(AUDIT_FAILURES, r)
        self.policy_reloads = _counter(POLICY_RELOADS, r)
        if figures is not None:
            r.register(figures)

    def render(self) -> bytes:
        """This broker's metrics in the Prometheus text format (`content_type`)."""
        return generate_latest(self.registry)


def _counter(family: Family, registry: CollectorRegistry) -> Counter:
    return Counter(family.name, family.help, family.labels, registry=registry)


def _histogram(family: Family, registry: CollectorRegistry) -> Histogram:
    return Histogram(
        family.name, family.help, family.labels, registry=registry, buckets=family.buckets
    )
