"""The sample names a metric exports in the Prometheus text format, for checking alert rules and
dashboards against the code. Imports no metrics library, so any process's metrics may use it."""

from __future__ import annotations

from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# The sample names each kind of metric produces, after its family's name.
SUFFIXES: dict[Kind, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def sample_names(name: str, kind: Kind) -> set[str]:
    """The samples of the metric `name` (as queried: a counter's ends in `_total`)."""
    # prometheus-client's naming: a counter's family drops `_total`, its samples add it back.
    family = name.removesuffix("_total") if kind == "counter" else name
    return {family + suffix for suffix in SUFFIXES[kind]}
