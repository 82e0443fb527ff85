"""Counters, gauges and histograms, and their Prometheus text exposition: what the sidecar's
`/metrics` needs of prometheus-client, in a page of code.

Why not prometheus-client here: importing it costs every pod 3.5 MB of anonymous memory and
about 30 ms of start (its package imports `http.server`, `urllib.request`, `wsgiref` and
`email` for exposition servers the sidecar does not run) — a quarter of a lean sidecar, for
twelve metrics (issue 13). The broker, one per cluster, keeps prometheus-client.

The text is what prometheus-client's `generate_latest` writes for the same metrics, byte for
byte (tests/test_sidecar_metrics.py compares the two): labels sorted by name, values as Go
prints floats, a counter's and a histogram's `_created` samples in a gauge family of their own
after it. Plus the `process_*` families of its process collector (memory, CPU, descriptors,
start time), read from /proc at scrape time.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Generic, Literal, TypeVar

# What prometheus-client 0.26 answers with (CONTENT_TYPE_LATEST), so scrapers see no change.
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]


def go_float(value: float) -> str:
    """A value as Go's Prometheus libraries print it (prometheus-client's `floatToGoString`)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class Series:
    """One labelled series (or the only one of an unlabelled metric)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramSeries:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (requests answered together, timed together)."""
        self.sum += value * count
        self.counts[bisect.bisect_left(self.bounds, value)] += count  # the first bound >= value


S = TypeVar("S", Series, HistogramSeries)


class Metric(Generic[S]):
    """A metric family; `labels(...)` finds or makes a series. Series are never removed: their
    labels come from small fixed sets (path classes, statuses, reasons)."""

    kind: Kind

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        # prometheus-client's naming: a counter's family drops `_total`, its sample adds it.
        self.name = name.removesuffix("_total") if self.kind == "counter" else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}

    def _new(self) -> S:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> S:
        key = values or tuple(named[label] for label in self.labelnames)
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}")
            series = self._series[key] = self._new()
        return series

    def sample_names(self) -> set[str]:
        """The sample names this family can write (for checking alerts and dashboards)."""
        if self.kind == "counter":
            return {self.name + "_total", self.name + "_created"}
        if self.kind == "histogram":
            return {self.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        return {self.name}

    def render(self) -> Iterator[str]:
        sample = self.name + "_total" if self.kind == "counter" else self.name
        yield f"# HELP {sample} {_escape_help(self.documentation)}\n"
        yield f"# TYPE {sample} {self.kind}\n"
        created: list[str] = []
        for key, series in self._series.items():
            labels = dict(zip(self.labelnames, key, strict=True))
            if isinstance(series, HistogramSeries):
                total = 0
                for bound, count in zip(series.bounds, series.counts, strict=True):
                    total += count
                    yield _line(self.name + "_bucket", {**labels, "le": go_float(bound)}, total)
                yield _line(self.name + "_count", labels, total)
                yield _line(self.name + "_sum", labels, series.sum)
            else:
                yield _line(sample, labels, series.value)
            if self.kind != "gauge":
                created.append(_line(self.name + "_created", labels, series.created))
        if created:
            yield f"# HELP {self.name}_created {_escape_help(self.documentation)}\n"
            yield f"# TYPE {self.name}_created gauge\n"
            yield from created


class Counter(Metric[Series]):
    kind: Kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.unlabelled = None if self.labelnames else self.labels()

    def _new(self) -> Series:
        return Series()

    def inc(self, amount: float = 1.0) -> None:
        assert self.unlabelled is not None, "a labelled metric counts through labels()"
        self.unlabelled.value += amount


class Gauge(Counter):
    kind: Kind = "gauge"

    def set(self, value: float) -> None:
        assert self.unlabelled is not None, "a labelled metric is set through labels()"
        self.unlabelled.value = float(value)


class Histogram(Metric[HistogramSeries]):
    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        self.bounds = bounds if bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames)
        self.unlabelled = None if self.labelnames else self.labels()

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def observe(self, value: float) -> None:
        assert self.unlabelled is not None, "a labelled metric observes through labels()"
        self.unlabelled.observe(value)


def _line(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {go_float(value)}\n"
    pairs = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{pairs}}} {go_float(value)}\n"


M = TypeVar("M", bound="Metric[Any]")


class Registry:
    """The metrics of one sidecar, in the order they were added."""

    def __init__(self) -> None:
        self.metrics: list[Metric[Any]] = []

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, documentation, labelnames))

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        return self._add(Histogram(name, documentation, labelnames, buckets=buckets))

    def _add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self, *, process: bool = True) -> bytes:
        """The text exposition, with the process's own families first (as prometheus-client's
        default registry has them)."""
        parts = list(process_families()) if process else []
        for metric in self.metrics:
            parts.extend(metric.render())
        return "".join(parts).encode()


def process_families(proc: str = "/proc/self") -> Iterator[str]:
    """prometheus-client's `process_*` families (its ProcessCollector), from /proc: nothing
    where /proc is not there."""
    try:
        with open(f"{proc}/stat", "rb") as stat:
            parts = stat.read().split(b")")[-1].split()
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return
    ticks = os.sysconf("SC_CLK_TCK")
    yield from _family("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                       "gauge", float(parts[20]))  # fmt: skip
    yield from _family("process_resident_memory_bytes", "Resident memory size in bytes.",
                       "gauge", float(parts[21]) * os.sysconf("SC_PAGESIZE"))  # fmt: skip
    yield from _family("process_start_time_seconds",
                       "Start time of the process since unix epoch in seconds.",
                       "gauge", float(parts[19]) / ticks + boot)  # fmt: skip
    yield from _family("process_cpu_seconds_total",
                       "Total user and system CPU time spent in seconds.",
                       "counter", (float(parts[11]) + float(parts[12])) / ticks)  # fmt: skip
    try:
        with open(f"{proc}/limits", "rb") as limits:
            max_fds = next(float(line.split()[3]) for line in limits
                           if line.startswith(b"Max open file"))  # fmt: skip
        open_fds = len(os.listdir(f"{proc}/fd"))
    except (OSError, StopIteration, ValueError):
        return
    yield from _family("process_open_fds", "Number of open file descriptors.", "gauge", open_fds)
    yield from _family("process_max_fds", "Maximum number of open file descriptors.",
                       "gauge", max_fds)  # fmt: skip


def _family(name: str, documentation: str, kind: Kind, value: float) -> Iterator[str]:
    yield f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n{name} {go_float(value)}\n"
