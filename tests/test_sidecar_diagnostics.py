"""Each reason a sidecar has no credentials shows as one line in /readyz and in the log, and
/healthz fails exactly when the refresh loop cannot make progress (a file to fix, or a bug)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.commands.certs import init_certs
from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory
from tests.support import Pki, issue, sidecar_config

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def not_ready_line(sidecar: Sidecar, pattern: str, timeout: float = 10.0) -> str:
    """Poll /readyz until its 503 line matches `pattern`; return the line."""
    deadline = time.monotonic() + timeout
    while True:
        status, text = await get(sidecar.admin_url + "/readyz")
        if status == 503 and re.search(pattern, text):
            assert "\n" not in text.strip(), text  # one line
            return text.strip()
        assert time.monotonic() < deadline, f"/readyz still says {status} {text!r}"
        await asyncio.sleep(0.05)


def logged_once(caplog: pytest.LogCaptureFixture, pattern: str) -> None:
    """The reason is logged on one line, once, however often the sidecar retried."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("metaproxy.sidecar")
        and re.search(pattern, r.getMessage())
        and r.levelno >= logging.WARNING
    ]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]


async def start_broken(
    start_sidecar: SidecarFactory, tmp_path: Path, task: str, **overrides: object
) -> Sidecar:
    return await start_sidecar("acme", task, ready=False, **overrides)


async def test_missing_ca_bundle(
    start_sidecar: SidecarFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA file that is not there: named in /readyz and the log; /healthz fails."""
    caplog.set_level(logging.INFO)
    missing = tmp_path / "no-such-ca.pem"
    sidecar = await start_broken(start_sidecar, tmp_path, "t-noca", broker_ca_file=missing)
    line = await not_ready_line(sidecar, "broker CA bundle unusable")
    assert (
        line
        == f"not ready: broker CA bundle unusable: CA bundle {missing}: No such file or directory"
    )
    status, text = await get(sidecar.admin_url + "/healthz")
    assert (status, text.startswith("unhealthy: broker CA bundle unusable")) == (503, True)
    await asyncio.sleep(1.5)  # a few retries
    logged_once(caplog, "CA bundle .*no-such-ca.pem")


async def test_invalid_ca_bundle(start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """A CA file without a certificate in it: named as invalid; /healthz fails."""
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    sidecar = await start_broken(start_sidecar, tmp_path, "t-badca", broker_ca_file=bad)
    line = await not_ready_line(sidecar, "broker CA bundle unusable")
    assert str(bad) in line
    assert (await get(sidecar.admin_url + "/healthz"))[0] == 503


async def test_tls_verification_failure_says_why(
    start_sidecar: SidecarFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA that did not sign the broker's certificate: TLS verification fails, with the reason;
    /healthz stays ok (the file is readable; the broker or the bundle may still change)."""
    caplog.set_level(logging.INFO)
    other = init_certs(tmp_path / "other-ca")["ca.pem"]
    sidecar = await start_broken(start_sidecar, tmp_path, "t-tls", broker_ca_file=other)
    line = await not_ready_line(sidecar, "TLS verification")
    print(line)
    assert "unable to get local issuer certificate" in line
    assert (await get(sidecar.admin_url + "/healthz"))[0] == 200
    await asyncio.sleep(1.5)
    logged_once(caplog, "TLS verification of the broker")


async def test_expired_identity_token_from_the_start(
    broker: BrokerServer, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar started with an expired token: one line with the expiry time, in the log too."""
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "expired.jwt"
    issued_at = time.time() - 7200
    token_file.write_text(issue(pki, "t-exp0", "acme", ttl=600, now=issued_at))
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued_at + 600))
    sidecar = Sidecar(sidecar_config(tmp_path, pki, broker.url, token_file))
    await sidecar.start()
    try:
        line = await not_ready_line(sidecar, "expired")
        assert line == f"not ready: identity token expired at {expiry} (broker answered 401)"
        assert re.search(ISO, line)
        await asyncio.sleep(1.5)
        logged_once(caplog, f"identity token expired at {expiry}")
    finally:
        await sidecar.aclose()


async def test_unreadable_identity_token_file(
    start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """No identity token file: the line names the file; /healthz fails."""
    missing = tmp_path / "no-token.jwt"
    sidecar = await start_broken(start_sidecar, tmp_path, "t-notoken", identity_token_file=missing)
    line = await not_ready_line(sidecar, "identity token file")
    assert line == f"not ready: identity token file unusable: {missing}: No such file or directory"
    status, text = await get(sidecar.admin_url + "/healthz")
    assert (status, "identity token file" in text) == (503, True)


async def test_broker_refusal_shows_its_code(
    broker: BrokerServer, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A task the policy does not know: the broker's 403 code and message are the line."""
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "stranger.jwt"
    token_file.write_text(issue(pki, "t-stranger", "no-such-tenant"))
    sidecar = Sidecar(sidecar_config(tmp_path, pki, broker.url, token_file))
    await sidecar.start()
    try:
        line = await not_ready_line(sidecar, "broker (denied|refused)")
        print(line)
        assert re.fullmatch(r"not ready: broker (denied this task: \w+ \(.+\)|refused .+)", line)
        assert (await get(sidecar.admin_url + "/healthz"))[0] == 200
    finally:
        await sidecar.aclose()


async def test_broker_unreachable(tmp_path: Path, pki: Pki) -> None:
    """Nothing listening at the broker's address: 'broker unreachable at URL: why'."""
    token_file = tmp_path / "unreach.jwt"
    token_file.write_text(issue(pki, "t-unreach", "acme"))
    config = sidecar_config(tmp_path, pki, "https://127.0.0.1:9", token_file)
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        line = await not_ready_line(sidecar, "unreachable")
        assert line.startswith("not ready: broker unreachable at https://127.0.0.1:9: ")
        assert (await get(sidecar.admin_url + "/healthz"))[0] == 200
    finally:
        await sidecar.aclose()


async def test_stopped_refresh_loop_fails_healthz(start_sidecar: SidecarFactory) -> None:
    """If the refresh loop ends, /healthz fails so the platform restarts the sidecar."""
    sidecar = await start_sidecar("acme", "t-dead")
    assert (await get(sidecar.admin_url + "/healthz"))[0] == 200
    task = sidecar.state.keeper._task
    assert task is not None
    task.cancel()
    await asyncio.sleep(0.05)
    status, text = await get(sidecar.admin_url + "/healthz")
    assert (status, text.startswith("unhealthy: credential refresh loop stopped")) == (503, True)
