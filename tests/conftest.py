"""Fixtures: real servers on loopback — moto's server as STS/S3, the broker, sidecars."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import tests.manifests
import tests.secret_scan
import tests.support
from metaproxy.broker.server import BrokerServer
from metaproxy.sidecar.process import Sidecar
from metaproxy.testing.clocks import VirtualTimeLoop
from metaproxy.testing.redis_server import RedisServer, find_server_binary
from tests.support import (
    REPO,
    Pki,
    broker_config,
    cannot_run,
    make_pki,
    sidecar_config,
    wait_ready,
)

# The broker (in this process) signs its STS calls to the local emulator with moto's fake
# credentials. Clients under test run in their own processes with `clean_aws_env()`, so they
# never see these.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",  # moto's documented fake credentials
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE="/nonexistent/config",
    AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
)


# -- virtual time ---------------------------------------------------------------------------
# A test marked `virtual_time` runs on `VirtualTimeLoop`: its sleeps, timeouts and
# `loop.time()` skip ahead instead of waiting. Every other async test runs on asyncio's own
# loop, as before; each test gets one factory, so no test id changes.


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("virtual_time") is not None:
        return {"virtual_time": VirtualTimeLoop}
    return {"asyncio": asyncio.new_event_loop}


# -- the longest tests first ------------------------------------------------------------------
# make test's first pass hands tests to its workers two at a time, in collection order
# (`--dist load --maxschedchunk 2`). The tests marked `slow` (5 to 20 s each) go first, one to
# each worker, the short ones fill in after them; in file order a 20 s test could start in the
# last seconds, with every other worker idle while it ran.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# -- the manifests, rendered once for every xdist worker (tests/manifests.py) ---------------


def pytest_configure(config: pytest.Config) -> None:
    controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if controller and tests.manifests.kustomize_problem() is None:
        workdir = Path(tempfile.mkdtemp(prefix="metaproxy-manifests-"))
        config.add_cleanup(lambda: shutil.rmtree(workdir, ignore_errors=True))
        tests.manifests.render_for_workers(workdir)


# -- what the secret scan (tests/secret_scan.py) looks for ----------------------------------
# Every identity token `issue()` makes and every secret key and session token a broker fixture
# cached, recorded as they are made so the scan can look for the exact values.
pytest_plugins = ["tests.secret_scan", "pytester"]
ISSUED_SECRETS = tests.secret_scan.ISSUED
_issue_token = tests.support.issue


def issue(pki: Pki, task: str, tenant: str, app: str = "web", **kwargs: Any) -> str:
    token = _issue_token(pki, task, tenant, app, **kwargs)
    ISSUED_SECRETS.add(token)
    return token


# Test modules import `issue` from tests.support after this conftest is loaded: they get this one.
tests.support.issue = issue


def record_broker_secrets(server: BrokerServer) -> None:
    for entry in server.cache.entries():
        ISSUED_SECRETS.add(entry.role.credentials.secret_access_key)
        ISSUED_SECRETS.add(entry.role.credentials.session_token)


@pytest.fixture
def record_secrets() -> Callable[[BrokerServer], None]:
    """For tests that start their own brokers: call it with each before stopping it."""
    return record_broker_secrets


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Identity, document, TLS and audit keys, made once per run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def sts_url() -> Iterator[str]:
    """moto's server as the local STS (and S3), one per run."""
    from metaproxy.testing.emulator import StsEmulator

    emulator = StsEmulator()
    url = emulator.start()
    yield url
    emulator.stop()


@pytest.fixture
def client_factory(sts_url: str) -> Callable[[], Any]:
    """boto3 S3 clients for moto's server (the run's emulator serves S3 as well as STS), as the
    broker's audit shipper makes them; this conftest sets moto's fake credentials."""
    from metaproxy.audit.ship import s3_client_factory

    return s3_client_factory(sts_url, "us-east-1")


@pytest.fixture
def bucket(client_factory: Callable[[], Any], request: pytest.FixtureRequest) -> str:
    """A fresh S3 bucket named after the test (one emulator serves the whole run)."""
    test = str(request.node.name).replace("_", "-")[:40].lower().strip("-")
    unique = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    name = f"t{unique}-{test}"
    client_factory().create_bucket(Bucket=name)
    return name


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped sample policies, free to edit."""
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


@pytest.fixture
async def broker(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> AsyncIterator[BrokerServer]:
    server = await BrokerServer.start(broker_config(tmp_path, pki, sts_url, policies_dir))
    yield server
    record_broker_secrets(server)
    await server.aclose()


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar(
    tmp_path: Path, pki: Pki, broker: BrokerServer
) -> AsyncIterator[SidecarFactory]:
    """Start a sidecar for a task of a tenant, wait until it is ready; stop them all after."""
    started: list[Sidecar] = []

    async def start(
        tenant: str, task: str, app: str = "web", ready: bool = True, **overrides: Any
    ) -> Sidecar:
        token_file = tmp_path / f"{tenant}-{task}.jwt"
        token_file.write_text(issue(pki, task, tenant, app))
        config = sidecar_config(tmp_path, pki, broker.url, token_file, **overrides)
        server = Sidecar(config)
        await server.start()
        started.append(server)
        if ready:
            await wait_ready(server.admin_url)
        return server

    yield start
    for server in started:
        await server.aclose()


@pytest.fixture
async def https(pki: Pki) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that trusts the test CA (the broker's TLS)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


def require_redis_server() -> str:
    """The valkey-server or redis-server binary; a skip without one, but a failure in CI, which
    installs redis-server (`make system-deps`) so the fleet's tests always run there."""
    binary = find_server_binary()
    if binary is None:
        cannot_run("neither valkey-server nor redis-server is on PATH (make system-deps)")
    return binary


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started Valkey/Redis (AOF, everysec) with its files in tmp_path/redis; stopped after."""
    server = RedisServer(tmp_path / "redis", binary=require_redis_server())
    server.start()
    yield server
    server.stop()
