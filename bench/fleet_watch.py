"""What the brokers, their store and the STS path say during a run, read from outside: the
brokers' /metrics (sampled, and their histograms after the run) and AssumeRole calls of our own
through the fault proxy, timed. Used by bench/cold_start.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from bench.fleet_harness import Replica

SAMPLE_SECONDS = 0.5  # how often each broker's /metrics is read during a run
# AssumeRole calls of the bench's own, timed, through the same fault proxy during each run: the
# STS path's latency measured directly (left out of the counts by their session name).
PROBES_PER_SECOND = 5.0
PROBE_SESSION = "sts-path-probe"


async def scrape(session: aiohttp.ClientSession, replica: Replica) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(replica.admin_url + "/metrics") as answer:
        text = await answer.text()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Sequence[Any], name: str, **labels: str) -> float:
    return sum(
        float(s.value)
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def bucket_quantile(samples: Sequence[Any], name: str, q: float, **labels: str) -> float | None:
    """The upper bound of the histogram bucket holding the q-quantile (summed over brokers):
    the answer is "at most this", at the buckets' resolution."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == name + "_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    count = buckets.get(float("inf"), 0.0)
    if not count:
        return None
    return next(bound for bound in sorted(buckets) if buckets[bound] >= q * count)


def mean(samples: Sequence[Any], name: str, **labels: str) -> float:
    """A histogram's mean (its _sum over its _count, summed over brokers); 0.0 when empty."""
    count = total(samples, name + "_count", **labels)
    return total(samples, name + "_sum", **labels) / count if count else 0.0


async def watch(replicas: Sequence[Replica], series: list[tuple[float, float, float]]) -> None:
    """(monotonic time, STS queue depth, STS workers) over all replicas, until cancelled."""
    async with aiohttp.ClientSession() as session:
        while True:
            scraped = await asyncio.gather(*(scrape(session, r) for r in replicas))
            samples = [s for one in scraped for s in one]
            depth = total(samples, "metaproxy_broker_queue_depth")
            series.append((time.monotonic(), depth, total(samples, "metaproxy_broker_workers")))
            await asyncio.sleep(SAMPLE_SECONDS)


async def probe_sts(url: str, seconds: list[float | None]) -> None:
    """AssumeRole through the fault proxy, one at a time, a few a second, until cancelled: what
    the brokers' calls meet beyond their own event loops (the added latency, moto, and the
    proxy's event loop, which is this process's)."""
    from metaproxy.broker.credentials.sts import AsyncSts
    from metaproxy.errors import MetaproxyError
    from metaproxy.models import AssumeRoleSpec

    sts = AsyncSts(endpoint=url, max_connections=1)
    try:
        for n in itertools.count():
            role = "arn:aws:iam::111111111111:role/probe"
            spec = AssumeRoleSpec(role, f"{PROBE_SESSION}.{n}", "", 900)
            started = time.monotonic()
            try:
                await sts.assume_role(spec)
            except MetaproxyError:
                seconds.append(None)  # no answer within the STS client's timeout
            else:
                seconds.append(time.monotonic() - started)
            await asyncio.sleep(1 / PROBES_PER_SECOND)
    finally:
        await sts.aclose()
