"""The sidecar's own metrics writer (metaproxy.sidecar.wire.exposition) writes what
prometheus-client writes for the same metrics, so dropping the library from the sidecar changed
nothing a scraper, an alert or a dashboard sees."""

from __future__ import annotations

import re
import subprocess
import sys

import prometheus_client

from metaproxy.sidecar.metrics import FAST_BUCKETS, SidecarMetrics
from metaproxy.sidecar.wire import exposition

CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.M)


def same_created(text: str) -> str:
    """`_created` samples are creation times, which differ between any two registries."""
    return CREATED.sub(r"\1 T", text)


def test_text_is_prometheus_clients() -> None:
    """Counters, gauges and histograms, labelled or not, render as prometheus-client renders
    them: names, help, types, sorted labels, Go floats, `_created` families after each."""
    ours = exposition.Registry()
    theirs = prometheus_client.CollectorRegistry()
    help_text = 'Requests by "class",\nwith a back\\slash.'
    counter = ours.counter("demo_requests_total", help_text, ["path_class", "status"])
    reference_counter = prometheus_client.Counter(
        "demo_requests_total", help_text, ["path_class", "status"], registry=theirs
    )
    histogram = ours.histogram("demo_seconds", "Time.", ["path_class"], buckets=FAST_BUCKETS)
    reference_histogram = prometheus_client.Histogram(
        "demo_seconds", "Time.", ["path_class"], buckets=FAST_BUCKETS, registry=theirs
    )
    plain = ours.histogram("demo_broker_seconds", "Broker.", buckets=(0.5, 5.0))
    reference_plain = prometheus_client.Histogram(
        "demo_broker_seconds", "Broker.", buckets=(0.5, 5.0), registry=theirs
    )
    gauge = ours.gauge("demo_ready", "Ready.")
    reference_gauge = prometheus_client.Gauge("demo_ready", "Ready.", registry=theirs)
    ours.counter("demo_refreshes_total", "Refreshes.", ["result"])  # never used: HELP, TYPE
    prometheus_client.Counter("demo_refreshes_total", "Refreshes.", ["result"], registry=theirs)

    for labels in (("token", "200"), ('we"ird\\', "429"), ("token", "200")):
        counter.labels(*labels).inc()
        reference_counter.labels(*labels).inc()
    for value in (0.00001, 0.0001, 0.0003, 0.7, 2.0, 123456789.0):
        histogram.labels("container").observe(value)
        reference_histogram.labels("container").observe(value)
        plain.observe(value)
        reference_plain.observe(value)
    gauge.set(1)
    reference_gauge.set(1)

    expected = prometheus_client.generate_latest(theirs).decode()
    actual = b"".join("".join(metric.render()).encode() for metric in ours.metrics).decode()
    assert same_created(expected) == same_created(actual)


def test_process_families_are_prometheus_clients() -> None:
    """The process_* families have prometheus-client's names, help and types."""
    theirs = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=theirs)
    reference = prometheus_client.generate_latest(theirs).decode()
    ours = "".join(exposition.process_families())
    assert [line for line in ours.splitlines() if line.startswith("#")] == [
        line for line in reference.splitlines() if line.startswith("#")
    ]


def test_go_float() -> None:
    """Values print as prometheus-client (and Go) print them."""
    for value in (0.0, 1.0, 0.0001, 2.5e-07, 1e6, 123456789.0, 1.7e9, float("inf"), -1.5):
        expected = prometheus_client.utils.floatToGoString(value)  # type: ignore[no-untyped-call]
        assert exposition.go_float(value) == expected


def test_sidecars_count_apart() -> None:
    """Each sidecar's metrics are its own: two in one process do not add up."""
    first, second = SidecarMetrics(), SidecarMetrics()
    first.requests.labels("token", "200", "127.0.0.1:8182").inc()
    assert b'status="200"} 1.0' in first.render()
    assert b'status="200"}' not in second.render()


def test_the_sidecar_never_imports_prometheus_client() -> None:
    """Starting and scraping a sidecar's metrics loads no prometheus-client."""
    code = (
        "import sys\n"
        "from metaproxy.sidecar.metrics import SidecarMetrics\n"
        "SidecarMetrics().render()\n"
        "sys.exit('prometheus_client' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
