"""The sample names a set of prometheus-client metrics exports, for checking alert rules and
dashboards against the code. Holds no metrics itself, so the sidecar's and the broker's metric
modules can both use it without registering each other's metrics."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics import MetricWrapperBase

# The sample names each metric type produces in the text exposition format.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def sample_names(metrics: Iterable[MetricWrapperBase]) -> set[str]:
    names: set[str] = set()
    for metric in metrics:
        for family in metric.describe():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names
