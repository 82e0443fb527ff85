"""Every selector we ship can match what a running sidecar and broker really expose.

The unit tests of the alert rules feed series written by hand, so a selector and its test can
agree with each other and with nothing else: `le="5"` passed them while the exporter writes
`le="5.0"`, and the start-latency alert could never fire. Here every selector in the alert
rules, their unit-test series, docs/slo.md and the dashboard is checked against the exposition
scraped from a real sidecar and broker after real traffic.
"""

from __future__ import annotations

import re
from collections import defaultdict

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metaproxy.broker.server import BrokerServer
from tests.conftest import SidecarFactory
from tests.test_metrics_names import TARGET_LABELS, queries

SELECTOR = re.compile(r"\b(metaproxy_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
# Labels whose values the code fixes (bucket bounds, the sidecar's path classes): a value the
# exposition does not show can never match. Other values (status="503", result="throttled")
# appear only once that happens, so for them only the label's name is checked.
CLOSED_LABELS = {"le", "path_class"}

Exposition = dict[str, list[dict[str, str]]]


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> str:
    async with session.get(admin_url + "/metrics") as answer:
        assert answer.status == 200
        return await answer.text()


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def parse(texts: list[str]) -> Exposition:
    """Sample name -> the label sets seen. A labelled metric nothing has touched yet (a policy
    reload that failed) is declared with no samples: its names map to no label sets."""
    samples: Exposition = defaultdict(list)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for suffix in SUFFIXES.get(family.type, ()):
                samples.setdefault(family.name + suffix, [])
            for sample in family.samples:
                samples[sample.name].append(sample.labels)
    return samples


def matches(op: str, pattern: str, value: str) -> bool:
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    hit = re.fullmatch(pattern, value) is not None  # PromQL regexes are anchored
    return hit if op == "=~" else not hit


def problems(query: str, exposition: Exposition) -> list[str]:
    found = []
    for name, body in SELECTOR.findall(query):
        seen = exposition.get(name)
        if seen is None:
            found.append(f"{name} is not in the exposition")
            continue
        if not seen:
            continue  # declared, not yet touched: its labels cannot be checked
        labels_seen = set().union(*(labels.keys() for labels in seen))
        for label, op, pattern in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue  # added by the scrape configuration
            if label not in labels_seen:
                found.append(f"{name}{{{body}}}: {name} has no label {label!r}")
            elif label in CLOSED_LABELS and not any(
                matches(op, pattern, labels.get(label, "")) for labels in seen
            ):
                values = sorted({labels[label] for labels in seen if label in labels})
                found.append(f'{name}{{{body}}}: {label}{op}"{pattern}" matches none of {values}')
    return found


@pytest.fixture
async def real_exposition(broker: BrokerServer, start_sidecar: SidecarFactory) -> Exposition:
    """A sidecar and its broker after the traffic the SLOs are about: an IMDS credential
    fetch, a container-credentials fetch, and the sidecar's own start."""
    sidecar = await start_sidecar("acme", "selectors")
    async with aiohttp.ClientSession() as session:
        async with session.put(
            sidecar.imds_url + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        ) as answer:
            token = await answer.text()
        imds = {"X-aws-ec2-metadata-token": token}
        base = sidecar.imds_url + "/latest/meta-data/iam/security-credentials/"
        async with session.get(base, headers=imds) as answer:
            role = (await answer.text()).strip()
        async with session.get(base + role, headers=imds) as answer:
            assert answer.status == 200
        auth = {"Authorization": sidecar.state.authorization_token}
        async with session.get(sidecar.container_url + "/v1/credentials", headers=auth) as a:
            assert a.status == 200
        texts = [await scrape(session, sidecar.admin_url), await scrape(session, broker.admin_url)]
    return parse(texts)


QUERIES = queries()


@pytest.mark.parametrize("where", sorted(QUERIES))
def test_selectors_match_the_real_exposition(where: str, real_exposition: Exposition) -> None:
    """Each selector names a sample that exists and label values it can take."""
    assert problems(QUERIES[where], real_exposition) == []


def test_a_selector_that_cannot_match_is_caught() -> None:
    """The check itself: `le="5"` against an exposition that writes `le="5.0"` is reported."""
    exposition: Exposition = {
        "metaproxy_sidecar_startup_seconds_bucket": [{"le": "5.0"}, {"le": "+Inf"}]
    }
    query = 'count(metaproxy_sidecar_startup_seconds_bucket{le="5"})'
    assert problems(query, exposition) == [
        'metaproxy_sidecar_startup_seconds_bucket{le="5"}: '
        "le=\"5\" matches none of ['+Inf', '5.0']"
    ]
    assert problems(query.replace('"5"', '"5.0"'), exposition) == []
