"""DNS rebinding: a page in a browser inside the task that re-points its own name at the sidecar
gets nothing, while every real client — which addresses the sidecar by IP or localhost and
sends no browser headers — keeps working."""

from __future__ import annotations

import asyncio
import json

import pytest

from metaproxy.sidecar.process import Sidecar
from metaproxy.sidecar.rebinding import from_browser_or_foreign_host, host_allowed
from tests.conftest import SidecarFactory
from tests.support import clean_aws_env, require_tool, run_command

CREDS = "/latest/meta-data/iam/security-credentials/acme-app"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("169.254.169.254", True),
        ("169.254.169.254:80", True),
        ("127.0.0.1:8181", True),
        ("[fd00:ec2::254]", True),
        ("[fd00:ec2::254]:80", True),
        ("localhost:8181", True),
        ("LOCALHOST", True),
        ("metadata.internal", True),  # allow-listed below
        ("evil.example", False),
        ("evil.example:80", False),
        ("169.254.169.254.evil.example", False),
        ("0x7f.1", False),
        ("[evil.example]", False),
        ("[::1", False),
        ("127.0.0.1:http", False),
        ("", False),
    ],
)
def test_host_values(host: str, allowed: bool) -> None:
    """IP literals (any port), localhost and allow-listed names pass; other names do not."""
    assert host_allowed(host, ("metadata.internal",)) is allowed


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "169.254.169.254", "origin": "http://evil.example"},
        {"host": "169.254.169.254", "sec-fetch-mode": "cors"},
        {"host": "169.254.169.254", "sec-fetch-site": "same-origin"},
        {"host": "evil.example"},
    ],
)
def test_browser_markers_are_refused(headers: dict[str, str]) -> None:
    """Origin or Sec-Fetch-* (only browsers send them), or a foreign Host, mean refusal."""
    assert from_browser_or_foreign_host(headers, ())


def test_request_without_host_is_not_a_browser() -> None:
    """HTTP/1.0 without Host (an old tool) is served: browsers always send Host."""
    assert not from_browser_or_foreign_host({}, ())


async def raw(sidecar_url: str, head: str) -> tuple[int, dict[str, str], str]:
    """Send one request head exactly as written; return status, headers, body."""
    host, _, port = sidecar_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body.decode()


async def imds_fetch(sidecar: Sidecar, extra: str, host: str = "169.254.169.254") -> int:
    """Token PUT then credentials GET, both with `Host: host` and the `extra` header lines."""
    status, _, token = await raw(
        sidecar.imds_url,
        f"PUT /latest/api/token HTTP/1.1\nHost: {host}\n{TTL}: 60\n{extra}Connection: close\n",
    )
    if status != 200:
        return status
    status, _, body = await raw(
        sidecar.imds_url,
        f"GET {CREDS} HTTP/1.1\nHost: {host}\nX-aws-ec2-metadata-token: {token}\n{extra}"
        "Connection: close\n",
    )
    if status == 200:
        assert json.loads(body)["Code"] == "Success"
    return status


@pytest.mark.parametrize(
    ("host", "extra"),
    [
        ("evil.example", ""),
        ("evil.example:80", ""),
        ("169.254.169.254", "Origin: http://evil.example\n"),
        ("169.254.169.254", "Sec-Fetch-Mode: cors\nSec-Fetch-Site: same-origin\n"),
        ("169.254.169.254", "Origin: null\n"),
    ],
    ids=["rebound-name", "rebound-name-port", "origin", "sec-fetch", "origin-null"],
)
async def test_rebound_page_gets_403_on_imds(
    start_sidecar: SidecarFactory, host: str, extra: str
) -> None:
    """A rebound page's token PUT is 403 (and so no credentials), in EC2's error format."""
    sidecar = await start_sidecar("acme", "t-rebind")
    assert await imds_fetch(sidecar, extra, host) == 403


async def test_rebound_page_gets_403_on_container_credentials(
    start_sidecar: SidecarFactory,
) -> None:
    """The container endpoint refuses a foreign Host too, even with the right token."""
    sidecar = await start_sidecar("acme", "t-rebind-c")
    auth = sidecar.state.authorization_token
    status, headers, body = await raw(
        sidecar.container_url,
        f"GET /v1/credentials HTTP/1.1\nHost: evil.example:8181\nAuthorization: {auth}\n"
        "Connection: close\n",
    )
    assert status == 403
    assert headers["content-type"] == "application/json"
    assert "SecretAccessKey" not in body


async def test_pipelined_repeats_from_a_foreign_host_are_each_refused(
    start_sidecar: SidecarFactory,
) -> None:
    """Copies of a request with a foreign Host, sent again and again on one connection (the
    repeated-request path), are each refused; the same request with our Host is served."""
    sidecar = await start_sidecar("acme", "t-rebind-repeat")
    auth = sidecar.state.authorization_token
    host, _, port = sidecar.container_url.removeprefix("http://").rpartition(":")
    for name, status in (("evil.example", b"403"), ("169.254.170.2", b"200")):
        request = f"GET /v1/credentials HTTP/1.1\r\nHost: {name}\r\nAuthorization: {auth}\r\n\r\n"
        reader, writer = await asyncio.open_connection(host, int(port))
        for copies in (1, 4, 4):
            writer.write(request.encode() * copies)
            data = b""
            while data.count(b"HTTP/1.1 ") < copies or not data.endswith(b"}"):
                data += await asyncio.wait_for(reader.read(65536), 3)
            assert [answer[:3] for answer in data.split(b"HTTP/1.1 ")[1:]] == [status] * copies
        writer.close()


async def test_allow_listed_name_is_served(start_sidecar: SidecarFactory) -> None:
    """A name the operator allow-listed (`--allowed-hosts`) is served like an IP."""
    sidecar = await start_sidecar("acme", "t-named", allowed_hosts=("Metadata.Internal.",))
    assert await imds_fetch(sidecar, "", "metadata.internal") == 200


# What each real client sends with its IMDS requests (from their sources): none sends a browser
# header, and each addresses the sidecar by IP (IPv4 or the IPv6 IMDS address).
REAL_CLIENT_HEADERS = {
    "go-v1": (
        "169.254.169.254",
        "User-Agent: aws-sdk-go/1.55.5 (go1.22.5; linux; amd64)\nAccept-Encoding: gzip\n",
    ),
    "go-v2": (
        "169.254.169.254",
        "User-Agent: aws-sdk-go-v2/1.30.3 os/linux lang/go#1.22.5 md/GOOS#linux "
        "md/GOARCH#amd64 api/ec2imds#1.16.11\nAmz-Sdk-Request: attempt=1; max=3\n"
        "Amz-Sdk-Invocation-Id: 3f1c2a9e-0c47-4a51-9a32-0b7e0c0b5d21\nAccept-Encoding: gzip\n",
    ),
    "go-v2-ipv6": ("[fd00:ec2::254]", "User-Agent: aws-sdk-go-v2/1.30.3\nAccept-Encoding: gzip\n"),
    "ruby": (
        "169.254.169.254",
        "Accept-Encoding: gzip;q=1.0,deflate;q=0.6,identity;q=0.3\nAccept: */*\n"
        "User-Agent: aws-sdk-ruby3/3.201.1\n",
    ),
    "cloud-init": (
        "169.254.169.254",
        "User-Agent: Cloud-Init/24.1.3\nAccept-Encoding: gzip, deflate\nAccept: */*\n",
    ),
}


@pytest.mark.parametrize("client", sorted(REAL_CLIENT_HEADERS))
async def test_real_client_request_heads_are_served(
    start_sidecar: SidecarFactory, client: str
) -> None:
    """Go v1/v2, Ruby and cloud-init request heads get their token and credentials."""
    sidecar = await start_sidecar("acme", f"t-{client}")
    host, extra = REAL_CLIENT_HEADERS[client]
    assert await imds_fetch(sidecar, extra, host) == 200


async def test_curl_gets_token_and_credentials(start_sidecar: SidecarFactory) -> None:
    """curl, as the IMDS documentation shows it, gets the credentials."""
    curl = require_tool("curl", "curl")
    sidecar = await start_sidecar("acme", "t-curl")
    env = clean_aws_env()
    rc, token, err = await run_command(
        curl,
        "-sf",
        "-X",
        "PUT",
        sidecar.imds_url + "/latest/api/token",
        "-H",
        f"{TTL}: 60",
        env=env,
    )
    assert rc == 0, err
    rc, body, err = await run_command(
        curl, "-sf", "-H", f"X-aws-ec2-metadata-token: {token}", sidecar.imds_url + CREDS, env=env
    )
    assert rc == 0, err
    assert json.loads(body)["Code"] == "Success"
