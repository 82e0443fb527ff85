"""The control API's own defences: its own connection cap, a token taken away when its file is,
refusals summarised rather than one fsynced record each, a CLI that keeps the token on https (or
loopback) and never follows a redirect, and a revocation that cannot be saved answered 503."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from metaproxy.broker.listeners import ADMIN_LIMITS, CONTROL_LIMITS
from metaproxy.broker.server import BrokerServer
from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from metaproxy.sidecar.config import SidecarConfig
from tests.conftest import record_broker_secrets
from tests.support import (
    CONTROL_TOKEN,
    Pki,
    audit_records,
    broker_config,
    control_token_file,
    run_command,
)

HEADERS = {"Authorization": f"Bearer {CONTROL_TOKEN}"}


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def hold(host: str, port: int, source: str) -> asyncio.StreamWriter:
    """A connection that says nothing (TCP only): it counts against its listener's cap until
    the header deadline."""
    _, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    return writer


async def revoke(https: aiohttp.ClientSession, broker: BrokerServer, task: str) -> int:
    url = broker.control_url + "/v1/revocations"
    async with https.post(url, json={"tenant": "acme", "task": task}, headers=HEADERS) as answer:
        return answer.status


async def test_every_admin_connection_held_leaves_the_control_api_its_own(
    broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """Scrapers holding all 64 admin connections do not keep an operator from revoking: the
    control port has its own cap (16), and filling that one leaves the admin port alone."""
    host, port = host_port(broker.admin_url)
    share = ADMIN_LIMITS.max_per_client
    sources = [f"127.0.6.{i // share + 1}" for i in range(ADMIN_LIMITS.max_connections)]
    held = [await hold(host, port, source) for source in sources]
    await asyncio.sleep(0.1)
    assert broker.listeners.admin_guard.open == ADMIN_LIMITS.max_connections
    assert await revoke(https, broker, "held-admin") == 200

    control_host, control_port = host_port(broker.control_url)
    per_client = CONTROL_LIMITS.max_per_client
    held += [
        await hold(control_host, control_port, f"127.0.7.{i // per_client + 1}")
        for i in range(CONTROL_LIMITS.max_connections)
    ]
    await asyncio.sleep(0.1)
    assert broker.listeners.control_guard.open == CONTROL_LIMITS.max_connections
    assert broker.listeners.admin_guard.open == ADMIN_LIMITS.max_connections
    for writer in held:
        writer.close()


async def test_a_token_file_emptied_or_removed_refuses_every_control_request(
    broker: BrokerServer, https: aiohttp.ClientSession
) -> None:
    """A rotated token (written beside and renamed over the old one, as a Secret is) is used at
    once; emptied or removed, the file takes the token away: the old one is refused too."""
    path = broker.config.control_token_file
    assert path is not None
    assert await revoke(https, broker, "rotation-0") == 200

    rotated = "rotated-control-token-0123456789"
    scratch = path.with_name("control.token.new")
    scratch.write_text(rotated + "\n")
    os.replace(scratch, path)
    assert await revoke(https, broker, "rotation-1") == 401  # the old token
    url = broker.control_url + "/v1/revocations"
    async with https.post(
        url,
        json={"tenant": "acme", "task": "rotation-2"},
        headers={"Authorization": f"Bearer {rotated}"},
    ) as answer:
        assert answer.status == 200

    path.write_text("")
    async with https.get(url, headers={"Authorization": f"Bearer {rotated}"}) as answer:
        assert answer.status == 401
    path.unlink()
    async with https.get(url, headers={"Authorization": f"Bearer {rotated}"}) as answer:
        assert answer.status == 401
    path.write_text(rotated + "\n")
    async with https.get(url, headers={"Authorization": f"Bearer {rotated}"}) as answer:
        assert answer.status == 200


async def test_repeated_refusals_from_one_peer_are_one_record_and_a_summary(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
) -> None:
    """60 requests with a wrong token from one address: the first is its own audit record, the
    rest are counted and written as one summary when its window ends (here, at shutdown)."""
    broker = await BrokerServer.start(broker_config(tmp_path, pki, sts_url, policies_dir))
    url = broker.control_url + "/v1/revocations"
    wrong = {"Authorization": "Bearer wrong-token-wrong-token"}
    statuses = []
    for _ in range(60):
        async with https.get(url, headers=wrong) as answer:
            statuses.append(answer.status)
    assert set(statuses) == {401}
    during = [
        r
        for r in audit_records(broker.config.audit_dir)
        if r.get("rule") == "control-authentication"
    ]
    assert len(during) == 1
    record_broker_secrets(broker)
    await broker.aclose()
    after = [
        r
        for r in audit_records(broker.config.audit_dir)
        if r.get("rule") == "control-authentication"
    ]
    assert [r.get("count") for r in after] == [None, 59]
    assert CONTROL_TOKEN not in json.dumps(after)


@pytest.fixture
async def redirector() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback "broker" that redirects every call to a second server, which records the
    Authorization header of anything that reaches it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"revocations": []})

    elsewhere = web.Application()
    elsewhere.router.add_route("*", "/{tail:.*}", record)
    there = web.AppRunner(elsewhere)
    await there.setup()
    there_site = web.TCPSite(there, "127.0.0.1", 0)
    await there_site.start()
    target = there.addresses[0]

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{target[1]}{request.path}")

    front = web.Application()
    front.router.add_route("*", "/{tail:.*}", redirect)
    here = web.AppRunner(front)
    await here.setup()
    await web.TCPSite(here, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{here.addresses[0][1]}", seen
    await here.cleanup()
    await there.cleanup()


async def test_the_revoke_cli_keeps_its_token_off_the_network_and_never_follows_a_redirect(
    tmp_path: Path, redirector: tuple[str, list[str]]
) -> None:
    """http:// only to loopback; https with an empty --broker-ca-file is refused (it would
    have meant the system's CAs); a 307 is reported, not followed with the bearer token."""
    token = control_token_file(tmp_path)
    base = [sys.executable, "-m", "metaproxy", "revoke", "--control-token-file", str(token)]
    env = dict(os.environ)
    rc, _, err = await run_command(
        *base, "--control-url", "http://10.0.0.1:9443", "--list", env=env
    )
    assert rc == 1 and "must be https://" in err
    rc, _, err = await run_command(
        *base,
        "--control-url",
        "https://127.0.0.1:9",
        "--broker-ca-file",
        "",
        "--list",
        env=env,
    )
    assert rc == 1 and "--broker-ca-file: empty" in err
    url, seen = redirector
    rc, _, err = await run_command(*base, "--control-url", url, "--list", env=env)
    assert rc == 1 and "HTTP 307" in err and "Traceback" not in err
    assert seen == []


def test_an_empty_ca_file_setting_is_refused_not_taken_for_the_system_cas(
    tmp_path: Path,
) -> None:
    """METAPROXY_BROKER_CA_FILE="" (a template left unfilled) stops the sidecar at start with
    one line naming the flag, instead of trusting every public CA for the broker."""
    with pytest.raises(ConfigError, match=r"^--broker-ca-file: empty"):
        build_config(SidecarConfig, None, {"METAPROXY_BROKER_CA_FILE": ""})


async def test_a_revocation_that_cannot_be_saved_is_a_503_and_audited(
    tmp_path: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    https: aiohttp.ClientSession,
) -> None:
    """The memory store's --state-dir not writable: 503 StoreUnavailable, one "failed" record
    naming the file, nothing revoked, and the broker goes on serving."""
    state = tmp_path / "state"
    config = replace(broker_config(tmp_path, pki, sts_url, policies_dir), state_dir=state)
    broker = await BrokerServer.start(config)
    try:
        (state / "revocations.json").mkdir()  # the atomic rename onto it fails: EISDIR
        url = broker.control_url + "/v1/revocations"
        async with https.post(
            url, json={"tenant": "acme", "task": "unsaved"}, headers=HEADERS
        ) as answer:
            assert answer.status == 503
            assert (await answer.json())["code"] == "StoreUnavailable"
        assert broker.revocations.entries() == []
        failed = [r for r in audit_records(broker.config.audit_dir) if r["event"] == "failed"]
        assert len(failed) == 1 and "revocations.json" in str(failed[0]["reason"])
        async with https.get(url, headers=HEADERS) as answer:
            assert answer.status == 200
    finally:
        record_broker_secrets(broker)
        await broker.aclose()
