"""Prometheus metrics of the broker: definitions only, in the default registry.

`status` labels are HTTP status codes as text ("200", "503"); `tenant` is the tenant's policy name
(bounded by the number of policy files, never a caller-supplied string).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from metaproxy.metric_names import sample_names

# Cached answers take about a millisecond; uncached ones wait for STS (hundreds of ms, seconds when
# throttled and retried).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Audit writes are synced; the broker refuses to issue when one exceeds audit_write_timeout
# (0.5 s by default).
# A percentage; the alert fires at 80 (deploy/prometheus/alerts.yaml).
PACKED_POLICY_BUCKETS = (10.0, 25.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 100.0)
AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter(
    "metaproxy_broker_requests_total",
    "Credential requests answered, by tenant and HTTP status.",
    ["tenant", "status"],
)
REQUEST_SECONDS = Histogram(
    "metaproxy_broker_request_seconds",
    "Time to answer a credential request, by outcome (cached, uncached, error).",
    ["outcome"],
    buckets=REQUEST_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "metaproxy_broker_queue_depth",
    "Requests waiting for an STS worker, by priority (cold, refresh).",
    ["priority"],
)
WORKERS = Gauge(
    "metaproxy_broker_workers",
    "STS workers currently running (the autoscaler moves this between its floor and ceiling).",
)
STS_CALLS = Counter(
    "metaproxy_broker_sts_calls_total",
    "STS AssumeRole attempts, by result (ok, throttled, error).",
    ["result"],
)
STS_SECONDS = Histogram(
    "metaproxy_broker_sts_seconds",
    "Time of one STS AssumeRole attempt.",
    buckets=STS_BUCKETS,
)
CACHE_HITS = Counter(
    "metaproxy_broker_cache_hits_total",
    "Credential requests answered from the broker's cache.",
)
COALESCED = Counter(
    "metaproxy_broker_coalesced_total",
    "Credential requests that joined an STS call already in flight instead of making their own.",
)
REJECTIONS = Counter(
    "metaproxy_broker_rejections_total",
    "Requests refused before reaching STS, by tenant and reason.",
    ["tenant", "reason"],
)
ISSUED = Counter(
    "metaproxy_broker_credentials_issued_total",
    "Credentials handed to a sidecar, by tenant.",
    ["tenant"],
)
AUDIT_WRITE_SECONDS = Histogram(
    "metaproxy_broker_audit_write_seconds",
    "Time to append (and sync) one audit record.",
    buckets=AUDIT_BUCKETS,
)
AUDIT_FAILURES = Counter(
    "metaproxy_broker_audit_failures_total",
    "Audit writes that failed or timed out; each one refused an issuance (fail closed).",
)
OPEN_CONNECTIONS = Gauge(
    "metaproxy_broker_open_connections",
    "Client connections currently open to the broker.",
)
CIRCUIT_OPEN = Gauge(
    "metaproxy_broker_circuit_open",
    "1 while the STS circuit breaker is open (STS failing; only cached credentials served).",
)
POLICY_RELOADS = Counter(
    "metaproxy_broker_policy_reloads_total",
    "Policy reloads, by result (ok, error); on error the last good policy set stays in force.",
    ["result"],
)
STS_REGION_CALLS = Counter(
    "metaproxy_broker_sts_region_calls_total",
    "STS AssumeRole attempts by region (--sts-regions) and result (ok, throttled, error).",
    ["region", "result"],
)
STS_REGION_CIRCUIT = Gauge(
    "metaproxy_broker_sts_region_circuit_state",
    "Each STS region's circuit: 0 closed, 1 half-open (probing), 2 open (calls go to the next "
    "region).",
    ["region"],
)
PACKED_POLICY_PERCENT = Histogram(
    "metaproxy_broker_sts_packed_policy_percent",
    "STS's PackedPolicySize of each AssumeRole: the session policy and tags as a percentage of "
    "what STS accepts (over 100 is refused with PackedPolicyTooLarge).",
    buckets=PACKED_POLICY_BUCKETS,
)
# The fleet (docs/fleet.md).
STORE_UP = Gauge(
    "metaproxy_broker_store_up",
    "1 while the fleet store answered the last command (always 1 with the in-memory store).",
)
LIVE_REPLICAS = Gauge(
    "metaproxy_broker_live_replicas",
    "Broker replicas live in the store's registry at this replica's last heartbeat.",
)
REVOCATION_VIEW_AGE = Gauge(
    "metaproxy_broker_revocation_view_age_seconds",
    "Seconds since this replica's revocations last matched the store; past "
    "--revocation-max-staleness it refuses to issue.",
)
REVOCATION_INTEGRITY = Counter(
    "metaproxy_broker_revocation_integrity_events_total",
    "Revocations this replica had to defend: restored (the store came back without one it "
    "held and no lift covered it: kept in force and written back), rejected (a stored value or "
    "pushed message that was malformed or not signed with the fleet's key), error (a re-read "
    "or push that failed unexpectedly). Any of these warrants a look (alert "
    "MetaproxyRevocationIntegrity).",
    ["event"],
)
BUDGET_SHARE = Gauge(
    "metaproxy_broker_sts_budget_share_per_second",
    "AssumeRole calls per second this replica may make: the whole budget while the store "
    "answers, budget / live replicas while it does not.",
)
SHARED_CACHE = Counter(
    "metaproxy_broker_shared_cache_total",
    "Fetches through the fleet's shared cache, by result (hit: another replica's set, wait: "
    "waited for another replica's call, fallback: the store did not answer).",
    ["result"],
)

_ALL: tuple[MetricWrapperBase, ...] = (
    STORE_UP,
    LIVE_REPLICAS,
    REVOCATION_VIEW_AGE,
    REVOCATION_INTEGRITY,
    BUDGET_SHARE,
    SHARED_CACHE,
    REQUESTS,
    REQUEST_SECONDS,
    QUEUE_DEPTH,
    WORKERS,
    STS_CALLS,
    STS_SECONDS,
    CACHE_HITS,
    COALESCED,
    REJECTIONS,
    ISSUED,
    AUDIT_WRITE_SECONDS,
    AUDIT_FAILURES,
    OPEN_CONNECTIONS,
    CIRCUIT_OPEN,
    POLICY_RELOADS,
    STS_REGION_CALLS,
    STS_REGION_CIRCUIT,
    PACKED_POLICY_PERCENT,
)


def exported_names() -> set[str]:
    """Every sample name this module's metrics can produce; alerts and dashboards must use these."""
    return sample_names(_ALL)
