"""What one broker's parts already count, read at scrape time into its metrics (`metrics.py`).

The scheduler, the STS caller, the regions' circuits, the revocation view and the fleet's
shared cache each keep their own totals; `FiguresCollector` turns one frozen `BrokerFigures`
into metric families when `/metrics` is scraped. A counter here *is* its part's total: nothing
is diffed between scrapes, so nothing can drift, and each broker shows only its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from metaproxy.broker import metrics as m
from metaproxy.broker.attest.attestor import AttestationStats
from metaproxy.broker.credentials.circuit import STATE_CODES
from metaproxy.broker.credentials.fleet import FleetCacheStats
from metaproxy.broker.credentials.jobs import SchedulerStats
from metaproxy.identity.remote_keys import KeySetStats

log = logging.getLogger("metaproxy.broker.metrics")

# A gauge cannot show infinity usefully (an unloaded revocation view is infinitely old).
MAX_AGE_SECONDS = 1e9


@dataclass(frozen=True, slots=True)
class FleetFigures:
    """The fleet as this replica sees it."""

    store_up: bool  # the store answered the last command
    live_replicas: int  # in the registry at this replica's last heartbeat
    revocation_view_age: float  # seconds since the view matched the store (inf: never)
    revocations_restored: int  # lost by the store, kept and written back
    revocations_rejected: int  # stored or pushed values refused (malformed or unsigned)
    revocation_errors: int  # re-reads or pushes that failed unexpectedly
    shared_cache: FleetCacheStats | None  # None: this process is the whole fleet


@dataclass(frozen=True, slots=True)
class SummarisedFigures:
    """Refusals counted into audit summaries rather than recorded one by one."""

    authentication: int
    control_authentication: int
    refusal: int


@dataclass(frozen=True, slots=True)
class BrokerFigures:
    scheduler: SchedulerStats
    open_connections: int
    fleet: FleetFigures
    summarised: SummarisedFigures
    key_sets: tuple[KeySetStats, ...] = ()  # issuers whose keys are fetched from a URL
    attestations: AttestationStats | None = None  # None: AWS attestation is off


Sample = tuple[tuple[str, ...], float]  # label values (in the family's label order), value


def counter(family: m.Family, *samples: Sample) -> CounterMetricFamily:
    found = CounterMetricFamily(family.name, family.help, labels=family.labels)
    for labels, value in samples:
        found.add_metric(labels, value)
    return found


def gauge(family: m.Family, *samples: Sample) -> GaugeMetricFamily:
    found = GaugeMetricFamily(family.name, family.help, labels=family.labels)
    for labels, value in samples:
        found.add_metric(labels, value)
    return found


def families(figures: BrokerFigures) -> Iterator[Metric]:
    """Every family read at scrape time, with this broker's samples."""
    s = figures.scheduler
    sts = s.sts
    yield gauge(m.QUEUE_DEPTH, (("cold",), s.queue_cold), (("refresh",), s.queue_refresh))
    yield gauge(m.WORKERS, ((), s.workers))
    yield gauge(m.OPEN_CONNECTIONS, ((), figures.open_connections))
    # Timeouts are among the errors; a refusal (4xx) is STS answering no, counted as an error.
    yield counter(
        m.STS_CALLS,
        (("ok",), sts.ok),
        (("throttled",), sts.throttles),
        (("error",), sts.errors + sts.refused),
    )
    yield gauge(m.CIRCUIT_OPEN, ((), 1.0 if sts.circuit_open else 0.0))
    yield gauge(m.BUDGET_SHARE, ((), sts.budget.share_per_second))
    yield counter(
        m.STS_REGION_CALLS,
        *(
            sample
            for region in sts.regions
            for sample in (
                ((region.region, "ok"), region.ok),
                ((region.region, "throttled"), region.throttled),
                ((region.region, "error"), region.error),
            )
        ),
    )
    yield gauge(
        m.STS_REGION_CIRCUIT,
        *(((region.region,), STATE_CODES[region.circuit]) for region in sts.regions),
    )
    fleet = figures.fleet
    yield gauge(m.STORE_UP, ((), 1.0 if fleet.store_up else 0.0))
    yield gauge(m.LIVE_REPLICAS, ((), fleet.live_replicas))
    yield gauge(m.REVOCATION_VIEW_AGE, ((), min(fleet.revocation_view_age, MAX_AGE_SECONDS)))
    yield counter(
        m.REVOCATION_INTEGRITY,
        (("restored",), fleet.revocations_restored),
        (("rejected",), fleet.revocations_rejected),
        (("error",), fleet.revocation_errors),
    )
    sets = figures.key_sets
    yield gauge(m.JWKS_AGE, *(((k.issuer,), min(k.age, MAX_AGE_SECONDS)) for k in sets))
    yield counter(m.JWKS_FETCH_FAILURES, *(((k.issuer,), k.failures) for k in sets))
    summarised = figures.summarised
    yield counter(
        m.AUDIT_SUMMARISED,
        (("authentication",), summarised.authentication),
        (("control-authentication",), summarised.control_authentication),
        (("refusal",), summarised.refusal),
    )
    attested = figures.attestations
    if attested is not None:
        yield counter(
            m.AWS_ATTESTATIONS,
            (("ok", ""), attested.ok),
            *((("refused", reason), count) for reason, count in attested.refused),
            (("unavailable", ""), attested.unavailable),
        )
    shared = fleet.shared_cache
    if shared is not None:
        yield counter(
            m.SHARED_CACHE,
            (("hit",), shared.hits),
            (("wait",), shared.waits),
            (("fallback",), shared.fallbacks),
        )


class FiguresCollector:
    """A prometheus-client collector over `read` (the broker's figures, taken when called)."""

    def __init__(self, read: Callable[[], BrokerFigures]) -> None:
        self._read = read
        self._last: BrokerFigures | None = None

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: the registry checks their names against the rest."""
        return [(counter if family.kind == "counter" else gauge)(family) for family in m.SCRAPED]

    def collect(self) -> Iterable[Metric]:
        try:
            self._last = self._read()
        except Exception:
            # A scrape must never fail the admin endpoint: the last figures are shown again.
            log.exception("broker figures unavailable; showing the last ones")
        return families(self._last) if self._last is not None else ()
