"""Regional STS with failover: two local STS endpoints stand for two regions, each behind a fault
proxy. The first is blackholed in the middle of steady issuance; issuance goes on through the
second and comes back to the first when it recovers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.credentials.regions import region_endpoints
from metaproxy.broker.server import BrokerServer
from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from metaproxy.testing.emulator import StsEmulator
from metaproxy.testing.faultproxy import FaultProxy
from metaproxy.testing.recording import max_calls_in_window
from tests.support import Pki, broker_config, issue

WEST, EAST = "us-west-2", "us-east-1"
STS_TIMEOUT = 1.0
# The broker's circuit defaults (FairScheduler): a region's circuit opens after 5 consecutive
# failures and lets one probe through after its cool-down (--sts-circuit-cool-down; 5 s by
# default, 1 s here: how long it is does not change what the test shows).
COOL_DOWN = 1.0
# The open delay: us-west-2's circuit opens when 5 calls in a row have failed. With the calls in
# flight when it went dark all timing out together, that is one STS timeout if at least 5 were
# in flight (here: 8 workers, and ~10 calls a second arriving), else ceil(5 / in flight) of them.
WORKERS = 8
OPENS_WITHIN = STS_TIMEOUT + 0.5
# Until then a request waits for its own timeout and its retry at us-east-1, and behind the
# requests already waiting so (the worker pool grows only as it sees calls take longer).
WORST_WAIT = 3 * STS_TIMEOUT
# Once the circuit is open no call goes to us-west-2 but a half-open probe after each
# cool-down, which pays one timeout before its retry.
AFTER_OPEN_WAIT = STS_TIMEOUT + 0.5


@pytest.fixture
async def east_sts() -> AsyncIterator[str]:
    """A second local STS (moto), the second region's."""
    async with StsEmulator() as emulator:
        yield emulator.url


@pytest.fixture
async def proxies(sts_url: str, east_sts: str) -> AsyncIterator[dict[str, FaultProxy]]:
    async with FaultProxy(sts_url) as west, FaultProxy(east_sts) as east:
        yield {WEST: west, EAST: east}


@dataclass
class Issuance:
    """One new task asking for credentials every `every` seconds, each answer timed."""

    broker: BrokerServer
    pki: Pki
    session: aiohttp.ClientSession
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, took, status)
    count: int = 0

    async def run(
        self, seconds: float, every: float = 0.1, until: Callable[[], bool] = lambda: False
    ) -> None:
        """For `seconds`, or until `until()` holds."""
        pending = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            pending.append(asyncio.create_task(self.one()))
            await asyncio.sleep(every)
        await asyncio.gather(*pending)

    async def one(self) -> None:
        self.count += 1
        token = issue(self.pki, f"steady-{self.count}", "acme")
        sent = time.monotonic()
        async with self.session.post(
            self.broker.url + "/v1/credentials",
            json={},
            headers={"Authorization": f"Bearer {token}"},
        ) as answer:
            await answer.read()
            self.answers.append((sent, time.monotonic() - sent, answer.status))


async def opened(broker: BrokerServer, region: str) -> float:
    """When `region`'s circuit was first seen open (polled every 20 ms)."""
    while broker.scheduler.stats().sts.region(region).circuit != "open":
        await asyncio.sleep(0.02)
    return time.monotonic()


def calls(proxy: FaultProxy) -> int:
    return len(proxy.assume_role_calls())


@pytest.mark.serial  # asserts how long calls wait, to within 0.5 s
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_blackholed_region_fails_over_to_the_next_and_calls_return_when_it_recovers(
    tmp_path: Path,
    pki: Pki,
    policies_dir: Path,
    proxies: dict[str, FaultProxy],
    https: aiohttp.ClientSession,
) -> None:
    """us-west-2 blackholed mid-issuance: every task still gets credentials; the circuit opens
    within one STS timeout (plus retries), after which calls go straight to us-east-1; after
    us-west-2 recovers, the next probe (within the cool-down) closes its circuit and calls
    go back to it."""
    west, east = proxies[WEST], proxies[EAST]
    config = broker_config(
        tmp_path,
        pki,
        "",
        policies_dir,
        sts_regions=(WEST, EAST),
        sts_region_endpoints=(f"{WEST}={west.url}", f"{EAST}={east.url}"),
        sts_timeout=STS_TIMEOUT,
        workers_min=WORKERS,
        sts_circuit_cool_down=COOL_DOWN,
    )
    broker = await BrokerServer.start(config)
    try:
        steady = Issuance(broker, pki, https)
        await steady.run(1.0)
        assert calls(west) > 0 and calls(east) == 0, "calls go to the first region"

        west.set(mode="blackhole")
        blackholed_at = time.monotonic()
        watch = asyncio.create_task(opened(broker, WEST))
        await steady.run(COOL_DOWN + 3.0)
        opened_at = await watch
        during = [a for a in steady.answers if a[0] >= blackholed_at]
        assert all(status == 200 for _, _, status in steady.answers), "a task got no credentials"
        assert opened_at - blackholed_at < OPENS_WITHIN
        assert east.assume_role_timeline()[0] - blackholed_at < OPENS_WITHIN
        assert max(took for _, took, _ in during) < WORST_WAIT
        settled = [took for sent, took, _ in during if sent > opened_at + STS_TIMEOUT]
        assert settled and max(settled) < AFTER_OPEN_WAIT
        assert calls(east) >= len(during)

        west.set(mode="pass")
        recovered_at = time.monotonic()
        west_before = calls(west)
        # Until the probe that closes the circuit, at most a cool-down away (waiting the whole
        # cool-down and more every time cost seconds for nothing), then a second for the calls
        # sent to us-east-1 before it closed to land.
        await steady.run(COOL_DOWN + 2.0, until=lambda: calls(west) > west_before)
        await steady.run(1.0)
        back = [t for t in west.assume_role_timeline()[west_before:] if t >= recovered_at]
        assert back, "calls never returned to the first region"
        assert back[0] - recovered_at < COOL_DOWN + 1.0
        east_after_return = calls(east)
        await steady.run(1.0)
        assert calls(east) == east_after_return, "calls stayed on the second region"
        assert all(status == 200 for _, _, status in steady.answers)
        assert broker.scheduler.stats().sts.region(WEST).circuit == "closed"

        async with https.get(broker.admin_url + "/metrics") as answer:
            exposition = await answer.text()
        for region in (WEST, EAST):
            assert (
                f'metaproxy_broker_sts_region_calls_total{{region="{region}",result="ok"}}'
                in exposition
            )
    finally:
        await broker.aclose()
    # One budget: the two regions' calls together stayed within it.
    both = west.assume_role_timeline() + east.assume_role_timeline()
    assert max_calls_in_window(both, 1.0) <= config.sts_budget_per_second


def test_region_endpoints_follow_the_order_and_fill_in_aws_defaults() -> None:
    """Configured endpoints by region; others empty (sts.REGION.amazonaws.com); one region
    alone may use --sts-endpoint."""
    assert region_endpoints([WEST, EAST], [f"{EAST}=http://127.0.0.1:1"]) == [
        (WEST, ""),
        (EAST, "http://127.0.0.1:1"),
    ]
    assert region_endpoints([WEST], [], "http://local") == [(WEST, "http://local")]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"METAPROXY_STS_REGIONS": "us-west-2,us-west-2"}, "us-west-2 is listed twice"),
        ({"METAPROXY_STS_REGIONS": "uswest"}, "'uswest' is not a region name"),
        (
            {
                "METAPROXY_STS_REGIONS": "us-west-2",
                "METAPROXY_STS_REGION_ENDPOINTS": "eu-west-1=http://x",
            },
            "'eu-west-1' is not one of the STS regions",
        ),
        (
            {"METAPROXY_STS_REGIONS": "us-west-2", "METAPROXY_STS_REGION_ENDPOINTS": "http://x"},
            "'http://x' must be REGION=URL",
        ),
        (
            {"METAPROXY_STS_REGIONS": "us-west-2,us-east-1", "METAPROXY_STS_ENDPOINT": "http://x"},
            "give each region its own with --sts-region-endpoints",
        ),
    ],
)
def test_bad_region_settings_are_refused_naming_the_flag(
    environ: dict[str, str], message: str
) -> None:
    """Repeated or malformed regions, endpoints for unknown regions, and one --sts-endpoint
    for several regions are refused at start."""
    with pytest.raises(ConfigError, match=message):
        build_config(BrokerConfig, None, environ)


@pytest.mark.parametrize("value", ["0", "0.05", "301", "-1"])
def test_a_circuit_cool_down_out_of_range_is_one_line_naming_the_flag(value: str) -> None:
    """--sts-circuit-cool-down takes 0.1 to 300 seconds; anything else is refused at start."""
    with pytest.raises(ConfigError, match="--sts-circuit-cool-down: must"):
        build_config(BrokerConfig, None, {"METAPROXY_STS_CIRCUIT_COOL_DOWN": value})
