"""Readiness, draining shutdown and reload, on real processes and a real broker.

No stand-in for our own HTTP: the sidecar talks to a real broker, placed behind the FaultProxy
when the test needs the broker unreachable (`refuse`) or a request held (`blackhole`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.demo.local import AUDIENCE, ISSUER
from metaproxy.sidecar.process import Sidecar
from metaproxy.testing.faultproxy import FaultProxy
from tests.support import Pki, broker_config, issue, sidecar_config

DRAIN_SECONDS = 3.0


@pytest.fixture
async def plain_broker(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    record_secrets: Callable[[BrokerServer], None],
) -> AsyncIterator[BrokerServer]:
    """A real broker on plain HTTP, so the FaultProxy (an HTTP proxy) can stand in front of it."""
    config = broker_config(tmp_path, pki, sts_url, policies_dir, tls_cert=None, tls_key=None)
    server = await BrokerServer.start(config)
    yield server
    record_secrets(server)
    await server.aclose()


@pytest.fixture
async def broker_proxy(plain_broker: BrokerServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(plain_broker.url) as proxy:
        yield proxy


async def get(url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as answer:
        return answer.status, await answer.text()


async def wait_for_file(path: Path, process: asyncio.subprocess.Process) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert process.returncode is None, "process exited before it was ready"
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def spawn(log: Path, *argv: str) -> asyncio.subprocess.Process:
    """`python -m metaproxy ARGV...`, its output kept in a log file (the secret scan reads it)."""
    with log.open("wb") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "metaproxy", *argv, stdout=output, stderr=output
        )


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_readyz_turns_ready_only_once_credentials_are_cached(
    tmp_path: Path, pki: Pki, broker_proxy: FaultProxy
) -> None:
    """While the broker is unreachable /readyz is 503; once it answers, ready follows."""
    broker_proxy.set(mode="refuse")
    token_file = tmp_path / "ready.jwt"
    token_file.write_text(issue(pki, "life-ready", "acme"))
    sidecar = Sidecar(sidecar_config(tmp_path, pki, broker_proxy.url, token_file))
    await sidecar.start()
    try:
        credentials_url = sidecar.container_url + "/v1/credentials"
        auth = {"Authorization": sidecar.state.authorization_token}
        for _ in range(10):
            status, text = await get(sidecar.admin_url + "/readyz")
            assert (status, text.startswith("not ready: ")) == (503, True)
            assert (await get(credentials_url, headers=auth))[0] == 503
            await asyncio.sleep(0.1)
        broker_proxy.set(mode="pass")
        deadline = time.monotonic() + 10
        # An SDK asking for credentials wakes the keeper (at most once a second), as here.
        while (await get(credentials_url, headers=auth))[0] != 200:
            assert time.monotonic() < deadline, "credentials never arrived"
            await asyncio.sleep(0.2)
        assert await get(sidecar.admin_url + "/readyz") == (200, "ready")
    finally:
        await sidecar.aclose()


async def test_sidecar_sigterm_completes_in_flight_request_then_exits(
    tmp_path: Path, pki: Pki, broker_proxy: FaultProxy
) -> None:
    """SIGTERM during a request: the request still gets its credentials; exit within the cap.

    How the request is held, honestly: with `--min-serve-seconds` above the credentials'
    lifetime, every credentials request is "inside the expiry window", so the handler asks the
    keeper for a refresh and waits up to 0.5 s for it (what it does for an SDK near expiry).
    The refresh goes to the real broker through the FaultProxy in `blackhole` mode, so it
    hangs and the request spends its full 0.5 s in flight; SIGTERM lands 0.2 s into it.
    """
    token_file = tmp_path / "drain.jwt"
    token_file.write_text(issue(pki, "life-drain", "acme"))
    auth_file = tmp_path / "drain.auth"
    ready_file = tmp_path / "sidecar-ready.json"
    process = await spawn(
        tmp_path / "sidecar-child.log",
        "sidecar",
        "--broker-url", broker_proxy.url,
        "--identity-token-file", str(token_file),
        "--authorization-token-file", str(auth_file),
        "--imds-listen", "127.0.0.1:0",
        "--container-listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--min-serve-seconds", "7200",
        "--drain-seconds", str(DRAIN_SECONDS),
        "--log-format", "json",
        "--ready-file", str(ready_file),
    )  # fmt: skip
    try:
        urls = await wait_for_file(ready_file, process)
        deadline = time.monotonic() + 15
        while (await get(urls["admin_url"] + "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "sidecar never became ready"
            await asyncio.sleep(0.05)

        broker_proxy.set(mode="blackhole")
        auth = {"Authorization": auth_file.read_text()}
        in_flight = asyncio.create_task(
            get(urls["container_urls"][0] + "/v1/credentials", headers=auth)
        )
        await asyncio.sleep(0.2)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status, body = await in_flight
        answered = time.monotonic() - signalled
        code = await asyncio.wait_for(process.wait(), DRAIN_SECONDS + 5)
        exited = time.monotonic() - signalled
    finally:
        broker_proxy.set(mode="pass")
        await stop_process(process)
    assert status == 200 and json.loads(body)["AccessKeyId"].startswith("ASIA")
    assert answered > 0.1  # it really was in flight when the signal arrived
    assert code == 0
    assert exited < DRAIN_SECONDS + 1.0


def broker_argv(tmp_path: Path, pki: Pki, sts: str, policies_dir: Path) -> list[str]:
    return [
        "broker",
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--policies-dir", str(policies_dir),
        "--policy-reload-seconds", "3600",  # only SIGHUP reloads within this test
        "--trust", f"{ISSUER},{AUDIENCE},{pki.jwks}",
        "--document-key", str(pki.document_key),
        "--audit-dir", str(tmp_path / "child-audit"),
        "--audit-key", str(pki.audit_key),
        "--sts-endpoint", sts,
        "--instance", "child-broker",
        "--drain-seconds", str(DRAIN_SECONDS),
        "--log-format", "json",
        "--ready-file", str(tmp_path / "broker-ready.json"),
    ]  # fmt: skip


async def post_credentials(url: str, token: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/credentials", json={}, headers=headers) as answer,
    ):
        return answer.status, await answer.json()


async def test_broker_sigterm_completes_in_flight_request_then_exits(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, issued_secrets: set[str]
) -> None:
    """A broker told to stop while STS is slow still answers the request it holds, then exits."""
    async with FaultProxy(sts_url) as slow_sts:
        slow_sts.set(latency=1.5)
        process = await spawn(
            tmp_path / "broker-child.log", *broker_argv(tmp_path, pki, slow_sts.url, policies_dir)
        )
        try:
            urls = await wait_for_file(tmp_path / "broker-ready.json", process)
            in_flight = asyncio.create_task(
                post_credentials(urls["url"], issue(pki, "life-broker", "acme"))
            )
            await asyncio.sleep(0.5)  # the STS call is under way
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            status, body = await in_flight
            code = await asyncio.wait_for(process.wait(), DRAIN_SECONDS + 5)
            exited = time.monotonic() - signalled
        finally:
            await stop_process(process)
    assert status == 200
    issued_secrets.update(
        (body["credentials"]["secret_access_key"], body["credentials"]["session_token"])
    )
    assert code == 0
    assert exited < DRAIN_SECONDS + 1.5


@pytest.mark.slow  # started first: see tests/conftest.py
async def test_broker_drain_cut_at_its_cap_still_exits_promptly(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """A request STS holds past --drain-seconds does not hold the broker: /readyz says draining
    while it drains, and it exits soon after the cap."""
    async with FaultProxy(sts_url) as slow_sts:
        slow_sts.set(latency=DRAIN_SECONDS + 5)
        process = await spawn(
            tmp_path / "broker-child.log", *broker_argv(tmp_path, pki, slow_sts.url, policies_dir)
        )
        try:
            urls = await wait_for_file(tmp_path / "broker-ready.json", process)
            in_flight = asyncio.create_task(
                post_credentials(urls["url"], issue(pki, "life-slow", "acme"))
            )
            await asyncio.sleep(0.5)  # the STS call is under way
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert await get(urls["admin_url"] + "/readyz") == (503, "draining")
            code = await asyncio.wait_for(process.wait(), DRAIN_SECONDS + 5)
            exited = time.monotonic() - signalled
            with contextlib.suppress(aiohttp.ClientError):
                await in_flight  # cut: the broker's answer, if any, is not the test's concern
        finally:
            await stop_process(process)
    assert code == 0
    assert DRAIN_SECONDS - 0.5 < exited < DRAIN_SECONDS + 2.0


async def test_broker_sighup_reloads_policies(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, issued_secrets: set[str]
) -> None:
    """A new tenant's policy file takes effect on SIGHUP (the poller is set to an hour)."""
    process = await spawn(
        tmp_path / "broker-child.log", *broker_argv(tmp_path, pki, sts_url, policies_dir)
    )
    try:
        urls = await wait_for_file(tmp_path / "broker-ready.json", process)
        token = issue(pki, "life-initech", "initech")
        assert (await post_credentials(urls["url"], token))[0] == 403
        globex = (policies_dir / "globex.toml").read_text()
        (policies_dir / "initech.toml").write_text(globex.replace("globex", "initech"))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (answer := await post_credentials(urls["url"], token))[0] != 200:
            assert time.monotonic() < deadline, f"policy not reloaded: {answer}"
            await asyncio.sleep(0.1)
        body = answer[1]
        assert body["role_arn"] == "arn:aws:iam::222222222222:role/initech-app"
        issued_secrets.update(
            (body["credentials"]["secret_access_key"], body["credentials"]["session_token"])
        )
        _, metrics = await get(urls["admin_url"] + "/metrics")
        assert 'metaproxy_broker_policy_reloads_total{result="ok"} 1.0' in metrics
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), DRAIN_SECONDS + 5) == 0
    finally:
        await stop_process(process)
