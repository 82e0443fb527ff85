"""Fixtures: real servers on loopback — moto's server as STS/S3, the broker, sidecars."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.sidecar.server import SidecarServer
from tests.support import REPO, Pki, broker_config, issue, make_pki, sidecar_config, wait_ready

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
    await server.stop()


SidecarFactory = Callable[..., Awaitable[SidecarServer]]


@pytest.fixture
async def start_sidecar(
    tmp_path: Path, pki: Pki, broker: BrokerServer
) -> AsyncIterator[SidecarFactory]:
    """Start a sidecar for a task of a tenant, wait until it is ready; stop them all after."""
    started: list[SidecarServer] = []

    async def start(
        tenant: str, task: str, app: str = "web", ready: bool = True, **overrides: Any
    ) -> SidecarServer:
        token_file = tmp_path / f"{tenant}-{task}.jwt"
        token_file.write_text(issue(pki, task, tenant, app))
        config = sidecar_config(tmp_path, pki, broker.url, token_file, **overrides)
        server = await SidecarServer.start(config)
        started.append(server)
        if ready:
            await wait_ready(server.admin_url)
        return server

    yield start
    for server in started:
        await server.stop()
