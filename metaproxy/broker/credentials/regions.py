"""Regional STS with failover: one STS client and one circuit per region, in order of preference.

The global endpoint (sts.amazonaws.com) is one region: when it failed, every pod that had pinned
it lost its credentials, and every call paid the trip there. So the broker calls the regional
endpoint of the first region whose circuit lets a call through (`sts.REGION.amazonaws.com`, or
an endpoint configured per region: tests, FIPS and VPC endpoints). A region that stops answering
(timeouts, 5xx, refused connections) opens its circuit and calls go to the next; after the
cool-down one probe goes back to it, and its success closes the circuit, so calls return to the
preferred region. A retry after such a failure goes to another region at once rather than wait
for the circuit to open. The STS call budget stays one budget: routing picks where a call goes,
never how many go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.credentials.circuit import STATE_CODES, CircuitBreaker, CircuitState
from metaproxy.broker.credentials.sts import AssumedRole, OnSent, StsClient
from metaproxy.models import AssumeRoleSpec, Credentials

DEFAULT_REGION_LABEL = "default"  # a scheduler given one bare client (tests, benchmarks)


class RegionalSts:
    """STS clients by region, in order of preference. As an `StsClient` on its own it calls the
    first region; the scheduler routes each call through `RegionRoutes`."""

    def __init__(self, regions: Iterable[tuple[str, StsClient]]) -> None:
        self.regions: tuple[tuple[str, StsClient], ...] = tuple(regions)
        if not self.regions:
            raise ValueError("RegionalSts needs at least one region")
        names = [name for name, _ in self.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"regions repeat: {names}")

    @classmethod
    def of(cls, sts: StsClient) -> RegionalSts:
        return sts if isinstance(sts, RegionalSts) else cls([(DEFAULT_REGION_LABEL, sts)])

    async def assume_role(
        self,
        spec: AssumeRoleSpec,
        *,
        signed_with: Credentials | None = None,
        on_sent: OnSent | None = None,
    ) -> AssumedRole:
        return await self.regions[0][1].assume_role(spec, signed_with=signed_with, on_sent=on_sent)

    async def aclose(self) -> None:
        for _, client in self.regions:
            await client.aclose()


def region_endpoints(
    regions: Sequence[str], endpoints: Sequence[str], single_endpoint: str = ""
) -> list[tuple[str, str]]:
    """(region, endpoint URL or "" for AWS's regional endpoint) in order. `endpoints` are
    `REGION=URL` entries; `single_endpoint` (--sts-endpoint) serves a lone region."""
    by_region = dict(entry.split("=", 1) for entry in endpoints)
    if len(regions) == 1 and single_endpoint and regions[0] not in by_region:
        by_region[regions[0]] = single_endpoint
    return [(region, by_region.get(region, "")) for region in regions]


@dataclass(frozen=True, slots=True)
class RegionStats:
    """One region's circuit, and what its calls came to."""

    region: str
    circuit: CircuitState
    ok: int
    throttled: int
    error: int


@dataclass(eq=False, slots=True)
class Route:
    """One region: its client, its circuit, and what its calls came to."""

    region: str
    client: StsClient
    breaker: CircuitBreaker
    ok: int = 0
    throttled: int = 0
    error: int = 0

    def stats(self) -> RegionStats:
        return RegionStats(self.region, self.breaker.state, self.ok, self.throttled, self.error)


class RegionRoutes:
    """The circuits of every region, seen by the scheduler as one: it fails fast only when no
    region would take a call."""

    def __init__(self, sts: StsClient, breaker: Callable[[], CircuitBreaker]) -> None:
        self.routes = tuple(
            Route(name, client, breaker()) for name, client in RegionalSts.of(sts).regions
        )

    def pick(self, avoid: str | None = None) -> Route | None:
        """The first region whose circuit lets a call through now (taking a half-open probe
        slot, like `CircuitBreaker.allow`); `avoid`, the region that just failed, only when no
        other region will do."""
        fallback: Route | None = None
        for route in self.routes:
            if route.region == avoid and len(self.routes) > 1:
                fallback = route
            elif route.breaker.allow():
                return route
        if fallback is not None and fallback.breaker.allow():
            return fallback
        return None

    def rejects_now(self) -> bool:
        return all(route.breaker.rejects_now() for route in self.routes)

    def retry_after(self) -> float:
        return min(route.breaker.retry_after() for route in self.routes)

    @property
    def state(self) -> CircuitState:
        """The best state of any region: open only when every region is."""
        return min((route.breaker.state for route in self.routes), key=STATE_CODES.__getitem__)

    @property
    def opened(self) -> int:
        return sum(route.breaker.opened for route in self.routes)

    def stats(self) -> tuple[RegionStats, ...]:
        return tuple(route.stats() for route in self.routes)


def regional_sts(config: BrokerConfig) -> RegionalSts:
    """One AsyncSts per configured region (`--sts-regions`, else `--sts-region`), in order."""
    from metaproxy.broker.credentials.sts import AsyncSts

    regions = config.sts_regions or (config.sts_region,)
    endpoints = region_endpoints(regions, config.sts_region_endpoints, config.sts_endpoint)
    return RegionalSts(
        (
            region,
            AsyncSts(
                endpoint=url,
                region=region,
                timeout=config.sts_timeout,
                max_connections=config.workers_max,
            ),
        )
        for region, url in endpoints
    )
