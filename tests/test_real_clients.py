"""Real, unmodified clients — botocore/boto3, the AWS CLI, the AWS SDK for JavaScript v3 — get
the tenant's role through the sidecar, each in its own process with no AWS configuration."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory
from tests.support import (
    REPO,
    Pki,
    caller_identity,
    clean_aws_env,
    require_tool,
    run_command,
    run_python,
    wait_ready,
)
from tests.test_imds_contract import call, own_broker_and_sidecar, token_for

ACME_ARN = "arn:aws:sts::111111111111:assumed-role/acme-app/acme.{task}"
GLOBEX_ARN = "arn:aws:sts::222222222222:assumed-role/globex-app/globex.{task}"
JS_DIR = REPO / "tests" / "js"
AWS_CLI = Path(sys.executable).with_name("aws")


def imds_env(sidecar: Sidecar, **extra: str) -> dict[str, str]:
    return clean_aws_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=sidecar.imds_url + "/", **extra)


def container_env(sidecar: Sidecar, **extra: str) -> dict[str, str]:
    token_file = sidecar.state.config.authorization_token_file
    assert token_file is not None
    return clean_aws_env(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=sidecar.container_url + "/v1/credentials",
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
        **extra,
    )


# --- botocore / boto3 ------------------------------------------------------------------------


async def test_boto3_uses_imdsv2(start_sidecar: SidecarFactory, sts_url: str) -> None:
    """boto3 through a sidecar that refuses IMDSv1 — so it must have used a session token."""
    sidecar = await start_sidecar("acme", "boto-v2")
    assert sidecar.state.config.imds_v1 == "refuse"
    identity = await caller_identity(sts_url, imds_env(sidecar))
    assert identity["Arn"] == ACME_ARN.format(task="boto-v2")


class XffProxy:
    """An egress HTTP proxy of the kind that tags requests with X-Forwarded-For.

    botocore sends its IMDS requests through `HTTP_PROXY` like any other; AWS refuses token PUTs
    that carry X-Forwarded-For (403) so that a proxy cannot be used to mint tokens, and SDKs
    answer a 403 on the token PUT by falling back to IMDSv1. This is how a real application can
    end up on IMDSv1 without any change to botocore."""

    def __init__(self) -> None:
        self.token_puts: list[int] = []
        self._session: aiohttp.ClientSession | None = None

    async def forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        skip = {"host", "content-length", "proxy-connection", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        headers["X-Forwarded-For"] = request.remote or "127.0.0.1"
        # botocore sends the absolute URL of the sidecar, as to any forward proxy.
        async with self._session.request(
            request.method, request.url, headers=headers, data=await request.read()
        ) as upstream:
            if request.path.endswith("/api/token"):
                self.token_puts.append(upstream.status)
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )

    async def __aenter__(self) -> XffProxy:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._session is not None
        await self._session.close()


@pytest.mark.parametrize("imds_v1", ["allow", "refuse"])
async def test_botocore_falls_back_to_imdsv1_only_where_allowed(
    start_sidecar: SidecarFactory, sts_url: str, aiohttp_server: Any, imds_v1: str
) -> None:
    """Behind a proxy adding X-Forwarded-For the token PUT is 403 and botocore falls back to
    IMDSv1: it gets the role when the sidecar allows v1, and nothing when it refuses v1."""
    sidecar = await start_sidecar("acme", f"boto-v1-{imds_v1}", imds_v1=imds_v1)
    async with XffProxy() as proxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.forward)
        server = await aiohttp_server(app)
        proxy_url = str(server.make_url("")).rstrip("/")
        # Only IMDS traffic goes through the proxy; STS calls go straight to the emulator.
        env = imds_env(sidecar, HTTP_PROXY=proxy_url, http_proxy=proxy_url, STS_URL=sts_url)
        env["NO_PROXY"] = env["no_proxy"] = _host_port(sts_url)
        rc, out, err = await run_python(_CALLER_FROM_ENV, env=env)
        assert proxy.token_puts and set(proxy.token_puts) == {403}
    if imds_v1 == "allow":
        assert rc == 0, err
        assert json.loads(out)["Arn"] == ACME_ARN.format(task="boto-v1-allow")
    else:
        assert rc != 0
        assert "Unable to locate credentials" in err


_CALLER_FROM_ENV = """
import json, os, boto3
sts = boto3.client("sts", endpoint_url=os.environ["STS_URL"])
print(json.dumps(sts.get_caller_identity()))
"""


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


async def test_botocore_reads_region_from_placement(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """botocore's IMDSRegionProvider (used for defaults_mode="auto") reads the region from the
    task's placement; the broker here places tasks in eu-west-2, so it cannot be a default."""
    async with own_broker_and_sidecar(
        tmp_path / "region",
        pki,
        sts_url,
        policies_dir,
        {"region": "eu-west-2", "availability_zone": "eu-west-2b"},
    ) as sidecar:
        env = imds_env(sidecar)
        env.pop("AWS_DEFAULT_REGION")
        env.pop("AWS_EC2_METADATA_DISABLED", None)  # botocore skips IMDS entirely if "true"
        rc, out, err = await run_python(
            "import json, botocore.session\n"
            "from botocore.utils import IMDSRegionProvider\n"
            "session = botocore.session.Session()\n"
            "print(json.dumps([session.get_config_variable('region'),"
            " IMDSRegionProvider(session).provide()]))",
            env=env,
        )
    assert rc == 0, err
    assert json.loads(out) == [None, "eu-west-2"]


_ACROSS_RESTART = """
import json, sys
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher

fetcher = InstanceMetadataFetcher(
    timeout=2, num_attempts=2, config={"ec2_metadata_service_endpoint": sys.argv[1]}
)
provider = InstanceMetadataProvider(iam_role_fetcher=fetcher)
for _ in range(2):
    credentials = provider.load()
    print(json.dumps(credentials.access_key if credentials else None), flush=True)
    sys.stdin.readline()
"""


class LineDriven:
    """A client process that prints one line per step and waits for a line before the next."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process, self._stdin, self._stdout = process, process.stdin, process.stdout

    async def next_line(self) -> Any:
        return json.loads(await asyncio.wait_for(self._stdout.readline(), 30))

    async def go_on(self) -> None:
        self._stdin.write(b"\n")
        await self._stdin.drain()

    async def finish(self) -> str:
        await self.go_on()
        _, err = await asyncio.wait_for(self.process.communicate(), 30)
        return err.decode()


async def test_botocore_recovers_when_the_sidecar_restarts(start_sidecar: SidecarFactory) -> None:
    """A sidecar restart changes the token key, so earlier tokens get 401; one botocore
    process keeps getting credentials across it, because botocore asks for a fresh token for
    every credential fetch (and on a 401 the JS SDK re-enables its token fetch likewise)."""
    first = await start_sidecar("acme", "restart-1")
    old_token = await token_for(first)
    instance_id = first.imds_url + "/latest/meta-data/instance-id"
    assert (await call("GET", instance_id, {"X-aws-ec2-metadata-token": old_token})).status == 200
    client = LineDriven(
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ACROSS_RESTART, first.imds_url + "/",
            env=clean_aws_env(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    )  # fmt: skip
    second: Sidecar | None = None
    try:
        before = await client.next_line()
        await first.aclose()
        # The same task on the same port: only the process (and so the token key) is new.
        address = first.imds_url.removeprefix("http://")
        second = Sidecar(replace(first.state.config, imds_listen=(address,)))
        await second.start()
        await wait_ready(second.admin_url)
        await client.go_on()
        after = await client.next_line()
        err = await client.finish()
        assert client.process.returncode == 0, err
        stale = await call("GET", instance_id, {"X-aws-ec2-metadata-token": old_token})
    finally:
        if client.process.returncode is None:
            client.process.kill()
            await client.process.wait()
        if second is not None:
            await second.aclose()
    assert stale.status == 401
    assert before.startswith("ASIA")
    assert after.startswith("ASIA")


# --- the AWS CLI -----------------------------------------------------------------------------


async def aws_cli_identity(sts_url: str, env: dict[str, str]) -> dict[str, Any]:
    rc, out, err = await run_command(
        str(AWS_CLI), "sts", "get-caller-identity", "--endpoint-url", sts_url, "--output", "json",
        env=env, timeout=90,
    )  # fmt: skip
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def test_aws_cli_through_imds(start_sidecar: SidecarFactory, sts_url: str) -> None:
    """`aws sts get-caller-identity` with only the IMDS endpoint set prints the tenant's role."""
    sidecar = await start_sidecar("acme", "cli-imds")
    identity = await aws_cli_identity(sts_url, imds_env(sidecar))
    assert identity["Arn"] == ACME_ARN.format(task="cli-imds")


async def test_aws_cli_through_container_credentials(
    start_sidecar: SidecarFactory, sts_url: str
) -> None:
    """The AWS CLI with FULL_URI and AUTHORIZATION_TOKEN_FILE prints the tenant's role."""
    sidecar = await start_sidecar("globex", "cli-ctr")
    identity = await aws_cli_identity(sts_url, container_env(sidecar))
    assert identity["Arn"] == GLOBEX_ARN.format(task="cli-ctr")


# --- the AWS SDK for JavaScript v3 -----------------------------------------------------------


async def node_identity(script: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    node = require_tool("node", "nodejs")
    if not (JS_DIR / "node_modules" / "@aws-sdk" / "client-sts").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `make test` (it runs `npm ci` there)")
    rc, out, err = await run_command(node, str(JS_DIR / script), *args, env=env, cwd=JS_DIR)
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def test_js_sdk_through_imds(start_sidecar: SidecarFactory, sts_url: str) -> None:
    """fromInstanceMetadata() with AWS_EC2_METADATA_SERVICE_ENDPOINT gets the tenant's role."""
    sidecar = await start_sidecar("acme", "js-imds")
    identity = await node_identity("imds.mjs", imds_env(sidecar), sts_url)
    assert identity["Arn"] == ACME_ARN.format(task="js-imds")


async def test_js_sdk_from_http_with_token_file(
    start_sidecar: SidecarFactory, sts_url: str
) -> None:
    """fromHttp() with FULL_URI on 127.0.0.1 and AUTHORIZATION_TOKEN_FILE gets the role."""
    sidecar = await start_sidecar("globex", "js-http")
    identity = await node_identity("container.mjs", container_env(sidecar), sts_url, "http")
    assert identity["Arn"] == GLOBEX_ARN.format(task="js-http")


async def test_js_sdk_from_container_metadata_with_token(
    start_sidecar: SidecarFactory, sts_url: str
) -> None:
    """fromContainerMetadata(), which reads only AWS_CONTAINER_AUTHORIZATION_TOKEN, gets the
    role too (it accepts FULL_URI hosts 127.0.0.1 and localhost only)."""
    sidecar = await start_sidecar("globex", "js-ctr")
    env = container_env(sidecar)
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = Path(
        env.pop("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    ).read_text()
    identity = await node_identity("container.mjs", env, sts_url, "container")
    assert identity["Arn"] == GLOBEX_ARN.format(task="js-ctr")
