"""The sidecar's Prometheus metrics: one `SidecarMetrics` per sidecar, held by its state.

Written by `exposition` (not prometheus-client, see why there); never the broker's metrics. The
`status` label is the HTTP status code as text ("200", "503"), so alerts can select
`status=~"5.."`.
"""

from __future__ import annotations

from typing import Any

from metaproxy.sidecar.wire.exposition import (
    CONTENT_TYPE,
    HistogramSeries,
    Metric,
    Registry,
    Series,
)

# Answers from the credentials cache take well under a millisecond; anything near a second means
# the sidecar is starved, so the buckets are dense at the bottom and stop at one second.
FAST_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# A broker call may include a cold STS AssumeRole, which takes hundreds of milliseconds.
BROKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The start-up SLO is "ready within 5 s"; the 5 s bucket is what it is measured against.
STARTUP_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class SidecarMetrics:
    """The metrics of one sidecar, and `render()` for its `/metrics`."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.registry = r = Registry()
        self.requests = r.counter(
            "metaproxy_sidecar_requests_total",
            "Requests answered by the sidecar, by path class "
            "(token, credentials, metadata, container, admin; throttled: refused over the "
            "pod's rate, 503 + Retry-After), HTTP status and the listen address that took them "
            "(which endpoint the task's clients use).",
            ["path_class", "status", "listener"],
        )
        self.request_seconds = r.histogram(
            "metaproxy_sidecar_request_seconds",
            "Time to answer a request, by path class.",
            ["path_class"],
            buckets=FAST_BUCKETS,
        )
        self.credentials_remaining = r.gauge(
            "metaproxy_sidecar_credentials_remaining_seconds",
            "Seconds until the cached credentials expire (0 when none are cached).",
        )
        self.identity_remaining = r.gauge(
            "metaproxy_sidecar_identity_remaining_seconds",
            "Seconds until the task's identity token expires, negative past it, as the token "
            "file read at the last broker call says (the task from its claims).",
            ["task"],
        )
        self.refreshes = r.counter(
            "metaproxy_sidecar_refreshes_total",
            "Credential fetches from the broker, by result (ok, error).",
            ["result"],
        )
        self.broker_seconds = r.histogram(
            "metaproxy_sidecar_broker_request_seconds",
            "Time of one credentials request to the broker, including retries.",
            buckets=BROKER_BUCKETS,
        )
        self.rejected = r.counter(
            "metaproxy_sidecar_rejected_total",
            "Requests or connections refused before being served, by reason "
            "(rate_limited, connection_cap, header_timeout, body_timeout, bad_request).",
            ["reason"],
        )
        self.open_connections = r.gauge(
            "metaproxy_sidecar_open_connections",
            "Client connections currently open to the sidecar's listeners.",
        )
        self.open_fds = r.gauge(
            "metaproxy_sidecar_open_fds",
            "File descriptors the sidecar process holds open.",
        )
        self.connection_cap = r.gauge(
            "metaproxy_sidecar_connection_cap",
            "Most client connections the task-facing listeners admit (tenant policy, within the "
            "descriptor budget).",
        )
        self.fd_budget = r.gauge(
            "metaproxy_sidecar_fd_budget",
            "File descriptors the sidecar stays under: the connection cap plus a reserve, within "
            "RLIMIT_NOFILE.",
        )
        self.ready = r.gauge(
            "metaproxy_sidecar_ready",
            "1 while the sidecar holds valid credentials and answers /readyz with 200, else 0.",
        )
        self.startup_seconds = r.histogram(
            "metaproxy_sidecar_startup_seconds",
            "Seconds from process start until /readyz first turned ready "
            "(observed once per process).",
            buckets=STARTUP_BUCKETS,
        )
        # (path class, status, listener) → its request count and its path class's timings:
        # looked up once, then every answer is an addition and a bucket (no label tuple, no
        # str(status)).
        self._answered: dict[tuple[str, int, str], tuple[Series, HistogramSeries]] = {}

    def answered(
        self, path_class: str, status: int, listener: str
    ) -> tuple[Series, HistogramSeries]:
        """The series that count and time an answer of `status` to `path_class`."""
        key = (path_class, status, listener)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = (
                self.requests.labels(path_class, str(status), listener),
                self.request_seconds.labels(path_class),
            )
        return series

    def render(self) -> bytes:
        return self.registry.render()


def exported_names() -> set[str]:
    """Every sample name the sidecar can write; alerts and dashboards must use these."""
    return {name for metric in families() for name in metric.sample_names()}


def families() -> list[Metric[Any]]:
    return SidecarMetrics().registry.metrics
