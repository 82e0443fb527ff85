"""An identity token that expires without being rotated is a state: /readyz says so with its
expiry time, the sidecar stops serving past the staleness limit, the metric names the task and
the alert fires on the sidecar's own exposition."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.clock import iso_z
from metaproxy.sidecar.identity_token import token_facts
from metaproxy.sidecar.process import Sidecar
from tests.support import (
    ALERT_RULES,
    Pki,
    assert_promtool_passes,
    broker_config,
    expected_annotations,
    issue,
    require_promtool,
    sidecar_config,
    wait_ready,
)

REMAINING = "metaproxy_sidecar_identity_remaining_seconds"


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, await answer.text()


@pytest.mark.parametrize("broker_after", ["refusing", "gone"])
@pytest.mark.slow  # started first: see tests/conftest.py
async def test_an_expired_identity_turns_readyz_and_serving_off(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, broker_after: str
) -> None:
    """A token with seconds to live: /readyz is 200 naming its expiry, then 503 'expired at'
    within one refresh period of it; past the staleness limit credentials are no longer
    served, whether the broker refuses the token or cannot be reached; the gauge, labelled
    with the task, goes negative and the alert fires (promtool)."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir, token_leeway_seconds=0)
    broker = await BrokerServer.start(config)
    token = issue(pki, "fading-task", "acme", ttl=60, now=time.time() - 54)  # ~6 s to live
    expiry = token_facts(token).expires_at
    assert expiry is not None
    token_file = tmp_path / "fading.jwt"
    token_file.write_text(token)
    period = 0.5
    sidecar = Sidecar(
        sidecar_config(
            tmp_path,
            pki,
            broker.url,
            token_file,
            revocation_check_seconds=period,
            revocation_max_staleness=1.5,
        )
    )
    await sidecar.start()
    try:
        await wait_ready(sidecar.admin_url)
        status, body = await get(sidecar.admin_url + "/readyz")
        assert status == 200
        assert f"identity token expires at {iso_z(expiry)}" in body
        auth_file = sidecar.config.authorization_token_file
        assert auth_file is not None
        auth = {"Authorization": auth_file.read_text().strip()}
        assert (await get(sidecar.container_url + "/v1/credentials", auth))[0] == 200
        if broker_after == "gone":
            await broker.aclose()

        await asyncio.sleep(max(0.0, expiry.timestamp() - time.time()))
        await asyncio.sleep(period)  # one refresh period
        status, body = await get(sidecar.admin_url + "/readyz")
        assert status == 503
        assert body == f"not ready: identity token expired at {iso_z(expiry)} and was not rotated"

        deadline = time.monotonic() + 1.5 + 3 * period + 5.0
        while (await get(sidecar.container_url + "/v1/credentials", auth))[0] == 200:
            assert time.monotonic() < deadline, "still serving past the staleness limit"
            await asyncio.sleep(0.1)
        exposition = (await get(sidecar.admin_url + "/metrics"))[1]
        line = next(x for x in exposition.splitlines() if x.startswith(REMAINING + "{"))
        assert 'task="fading-task"' in line
        remaining = float(line.rsplit(" ", 1)[1])
        assert remaining < 0
        assert "metaproxy_sidecar_ready 0" in exposition
        assert_identity_alert_fires(tmp_path, line)
    finally:
        await sidecar.aclose()
        await broker.aclose()


def assert_identity_alert_fires(tmp_path: Path, sample_line: str) -> None:
    """promtool, fed the sample as the sidecar exposed it (with the pod label the scrape adds),
    fires MetaproxySidecarIdentityExpiring naming the task."""
    promtool, rules = require_promtool(), ALERT_RULES
    selector, value = sample_line.rsplit(" ", 1)
    series = selector.replace("{", '{namespace="acme",pod="app-0",', 1)
    labels = {"namespace": "acme", "pod": "app-0", "task": "fading-task"}
    annotations = expected_annotations("MetaproxySidecarIdentityExpiring", labels)
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": f"{float(value):g}-60x10"}],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "MetaproxySidecarIdentityExpiring",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "namespace": "acme",
                                    "pod": "app-0",
                                    "task": "fading-task",
                                },
                                "exp_annotations": annotations,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    assert_promtool_passes(promtool, tmp_path / "identity_alert_test.yaml", test)
