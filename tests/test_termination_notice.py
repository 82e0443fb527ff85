"""A stopping task is announced as EC2 announces an instance's end, and keeps its credentials.

On SIGTERM the sidecar serves `meta-data/spot/instance-action` and
`meta-data/autoscaling/target-lifecycle-state: Terminated` for the rest of its drain, while its
listeners keep serving credentials until the task's clients go quiet or the drain runs out.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from tests.support import Pki, issue, start_sidecar_process, wait_ready

TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "600"}
SECRET = "/v2/credentials/" + "stopping" * 3
DRAIN_SECONDS = 4.0


@pytest.mark.serial  # asserts the notice within 1 s, the drain to within 1 s
async def test_sigterm_announces_the_end_and_credentials_keep_coming(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """Within 1 s of SIGTERM instance-action and the lifecycle state appear, and a client that
    keeps asking gets credentials on every try until the drain ends."""
    child = await start_sidecar_process(
        tmp_path, broker.url, pki, issue(pki, "stop-1", "acme"),
        "--container-credentials-path", SECRET, "--drain-seconds", str(DRAIN_SECONDS),
    )  # fmt: skip
    imds, container = child.ready["imds_urls"][0], child.ready["container_urls"][0]
    await wait_ready(child.ready["admin_url"])
    credentials: list[int] = []
    notice: tuple[float, dict[str, str]] | None = None
    lifecycle = ""
    async with aiohttp.ClientSession() as session:
        async with session.put(imds + "/latest/api/token", headers=TTL) as answer:
            token = {"X-aws-ec2-metadata-token": await answer.text()}
        async with session.get(imds + "/latest/meta-data/spot/instance-action", headers=token) as a:
            assert a.status == 404  # nothing to announce yet
        signalled, signalled_at = time.monotonic(), datetime.now(UTC)
        child.process.send_signal(signal.SIGTERM)
        while True:
            try:
                async with session.get(container + SECRET) as answer:
                    credentials.append(answer.status)
                    assert (await answer.json())["AccessKeyId"].startswith("ASIA")
                action = imds + "/latest/meta-data/spot/instance-action"
                async with session.get(action, headers=token) as answer:
                    if answer.status == 200 and notice is None:
                        notice = (time.monotonic() - signalled, json.loads(await answer.text()))
                state = imds + "/latest/meta-data/autoscaling/target-lifecycle-state"
                async with session.get(state, headers=token) as answer:
                    lifecycle = await answer.text() if answer.status == 200 else lifecycle
            except aiohttp.ClientConnectionError:
                break  # the listeners closed: the drain is over
            await asyncio.sleep(0.1)
        stopped = time.monotonic() - signalled
    code = await asyncio.to_thread(child.process.wait, 10)
    assert code == 0
    assert notice is not None and notice[0] < 1.0
    assert notice[1]["action"] == "terminate"
    deadline = datetime.strptime(notice[1]["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    # The drain's end, to the second: measured from the signal, not from now, which is after it.
    assert DRAIN_SECONDS - 1 < (deadline - signalled_at).total_seconds() <= DRAIN_SECONDS + 1
    assert lifecycle == "Terminated"
    assert credentials and set(credentials) == {200}
    assert DRAIN_SECONDS - 1.5 <= stopped <= DRAIN_SECONDS + 1.0  # served on while asked


async def test_a_sidecar_nobody_asks_stops_soon_after_sigterm(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """With its clients gone (Kubernetes stops a native sidecar after the app), the sidecar
    does not sit out the whole drain: it exits after a second of quiet."""
    child = await start_sidecar_process(
        tmp_path, broker.url, pki, issue(pki, "stop-2", "acme"), "--drain-seconds", "20"
    )
    await wait_ready(child.ready["admin_url"])
    signalled = time.monotonic()
    child.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(child.process.wait, 20) == 0
    assert time.monotonic() - signalled < 5.0


async def test_the_apps_pre_stop_hook_announces_the_end_before_their_sigterm(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """Kubernetes stops a native sidecar after the apps, so the apps' preStop hook tells it:
    with the pod's token the notice appears and the hook is held for the notice period; without
    it the admin port refuses (403) and nothing is announced."""
    child = await start_sidecar_process(
        tmp_path, broker.url, pki, issue(pki, "stop-3", "acme"),
        "--lifecycle-token", "pod-lifecycle-token-0123456789abcdef",
        "--termination-notice-seconds", "1",
    )  # fmt: skip
    admin, imds = child.ready["admin_url"], child.ready["imds_urls"][0]
    try:
        await wait_ready(admin)
        async with aiohttp.ClientSession() as session:
            async with session.put(imds + "/latest/api/token", headers=TTL) as answer:
                token = {"X-aws-ec2-metadata-token": await answer.text()}
            action = imds + "/latest/meta-data/spot/instance-action"
            for forged in ({}, {"X-Metaproxy-Lifecycle-Token": "guess"}):
                async with session.get(admin + "/lifecycle/terminate", headers=forged) as answer:
                    assert answer.status == 403
            async with session.get(action, headers=token) as answer:
                assert answer.status == 404
            started = time.monotonic()
            hook = {"X-Metaproxy-Lifecycle-Token": "pod-lifecycle-token-0123456789abcdef"}
            pending = asyncio.ensure_future(
                session.get(admin + "/lifecycle/terminate", headers=hook)
            )
            await asyncio.sleep(0.3)  # the hook is held: the app has no SIGTERM yet
            async with session.get(action, headers=token) as answer:
                assert answer.status == 200
                assert json.loads(await answer.text())["action"] == "terminate"
            async with await pending as answer:
                assert answer.status == 200
            assert time.monotonic() - started >= 1.0
            async with session.get(admin + "/readyz") as answer:
                assert answer.status == 200  # still serving: only the apps are stopping
    finally:
        await asyncio.to_thread(child.stop)
