"""The sidecar's IMDS answers exactly what botocore and the JS SDK depend on: status, body, headers.

Every response is checked for `Server: EC2ws` in `call()`, errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from metaproxy.broker.server import BrokerServer
from metaproxy.identity.document import verify_document
from metaproxy.metadata_paths import permitted
from metaproxy.sidecar.process import Sidecar
from metaproxy.sidecar.tokens import TokenAuthority
from tests.conftest import SidecarFactory
from tests.support import Pki, broker_config, issue, run_command, sidecar_config, wait_ready

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ROLE = "acme-app"
CREDS = "/latest/meta-data/iam/security-credentials/"


@dataclass
class Answer:
    status: int
    body: str
    # Header names compare as HTTP has them compare: without case (EC2 writes
    # `X-Aws-Ec2-Metadata-Token-Ttl-Seconds`, clients send `X-aws-ec2-metadata-token-…`).
    headers: Mapping[str, str] = field(default_factory=CIMultiDict)


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, *, encoded: bool = False
) -> Answer:
    """One request; every IMDS answer, success or error, carries EC2's `Server` header."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, URL(url, encoded=encoded), headers=headers) as response,
    ):
        answer = Answer(response.status, await response.text(), CIMultiDict(response.headers))
    assert answer.headers.get("Server") == "EC2ws", (method, url, answer.headers)
    return answer


async def token_for(sidecar: Sidecar, ttl: str = "21600") -> str:
    answer = await call("PUT", sidecar.imds_url + "/latest/api/token", {TTL: ttl})
    assert answer.status == 200
    return answer.body


async def get(sidecar: Sidecar, path: str, token: str | None = None) -> Answer:
    token = token if token is not None else await token_for(sidecar)
    return await call("GET", sidecar.imds_url + path, {TOKEN: token})


def assert_aws_error(answer: Answer, status: int, title: str) -> None:
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("text/html")
    assert f"<title>{status} - {title}</title>" in answer.body
    assert answer.body.startswith('<?xml version="1.0" encoding="iso-8859-1"?>')


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar("acme", "task-1")


# --- IMDSv2 session tokens -------------------------------------------------------------------


async def test_token_put_returns_plain_token_and_echoes_ttl(sidecar: Sidecar) -> None:
    """PUT /latest/api/token with a valid TTL: 200 text/plain token, TTL header echoed."""
    answer = await call("PUT", sidecar.imds_url + "/latest/api/token", {TTL: "300"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/plain"
    assert answer.headers[TTL] == "300"
    assert re.fullmatch(r"[A-Za-z0-9_=-]{20,}", answer.body)


@pytest.mark.parametrize("ttl", ["1", "21600"])
async def test_token_ttl_bounds_are_inclusive(sidecar: Sidecar, ttl: str) -> None:
    """TTLs of exactly 1 and 21600 seconds are accepted."""
    answer = await call("PUT", sidecar.imds_url + "/latest/api/token", {TTL: ttl})
    assert (answer.status, answer.headers[TTL]) == (200, ttl)


@pytest.mark.parametrize("ttl", [None, "", "abc", "0", "21601", "-1", "1.5", "0x10", "²", "9" * 9])
async def test_token_put_with_bad_ttl_is_400(sidecar: Sidecar, ttl: str | None) -> None:
    """A missing, non-numeric or out-of-range TTL is 400: SDKs give up rather than fall back."""
    headers = {TTL: ttl} if ttl is not None else {}
    answer = await call("PUT", sidecar.imds_url + "/latest/api/token", headers)
    assert_aws_error(answer, 400, "Bad Request")


async def test_token_on_versioned_path_is_403(sidecar: Sidecar) -> None:
    """Tokens exist only at /latest/api/token; a dated version path is 403 (SDKs fall back)."""
    answer = await call("PUT", sidecar.imds_url + "/2021-03-23/api/token", {TTL: "60"})
    assert_aws_error(answer, 403, "Forbidden")


async def test_token_put_through_a_proxy_is_403(sidecar: Sidecar) -> None:
    """A token PUT carrying X-Forwarded-For came through a proxy: 403, so SSRF cannot mint one."""
    headers = {TTL: "60", "X-Forwarded-For": "203.0.113.9"}
    answer = await call("PUT", sidecar.imds_url + "/latest/api/token", headers)
    assert_aws_error(answer, 403, "Forbidden")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_non_put_on_token_path_is_405_with_allow(sidecar: Sidecar, method: str) -> None:
    """Any other method on the token path: EC2's 405 (no body, `Allow: OPTIONS, PUT`)."""
    answer = await call(method, sidecar.imds_url + "/latest/api/token", {TTL: "60"})
    assert (answer.status, answer.body) == (405, "")
    assert answer.headers["Content-Type"] == "text/plain"
    assert answer.headers["Allow"] == "OPTIONS, PUT"


@pytest.mark.parametrize(
    "token",
    [None, "", "not-a-token", "A" * 44, TokenAuthority().mint(600)],
    ids=["missing", "empty", "garbage", "right-length", "other-sidecars-key"],
)
async def test_get_without_valid_token_is_401(sidecar: Sidecar, token: str | None) -> None:
    """With IMDSv1 refused, a GET without a token this sidecar signed is 401."""
    headers = {TOKEN: token} if token is not None else {}
    answer = await call("GET", sidecar.imds_url + "/latest/meta-data/instance-id", headers)
    assert_aws_error(answer, 401, "Unauthorized")


async def test_expired_token_is_401(sidecar: Sidecar) -> None:
    """A token past its TTL is refused."""
    token = await token_for(sidecar, ttl="1")
    assert (await get(sidecar, "/latest/meta-data/instance-id", token)).status == 200
    await asyncio.sleep(1.2)
    assert_aws_error(
        await get(sidecar, "/latest/meta-data/instance-id", token), 401, "Unauthorized"
    )


async def test_a_repeated_request_sees_its_token_count_down_and_expire(sidecar: Sidecar) -> None:
    """The same request again and again on one kept-alive connection (answered from what the
    sidecar noted the first time): the TTL header counts the token down second by second, and
    the moment the token has expired the answer is 401."""
    token = await token_for(sidecar, ttl="2")
    host, port = sidecar.imds_url.removeprefix("http://").rsplit(":", 1)
    request = f"GET {CREDS}{ROLE} HTTP/1.1\r\nHost: {host}\r\n{TOKEN}: {token}\r\n\r\n"
    reader, writer = await asyncio.open_connection(host, int(port))
    seen: list[str] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and "401" not in seen:
        writer.write(request.encode() * 2)
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith((b"}", b">\n")):
            data += await asyncio.wait_for(reader.read(65536), 3)
        for answer in data.split(b"HTTP/1.1 ")[1:]:
            ttl = re.search(rb"\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: (\d+)\r\n", answer)
            seen.append(ttl.group(1).decode() if ttl else answer[:3].decode())
        await asyncio.sleep(0.05)
    writer.close()
    distinct = list(dict.fromkeys(seen))
    assert distinct == ["1", "0", "401"] or distinct == ["2", "1", "0", "401"]


async def test_many_concurrent_tokens_all_work(sidecar: Sidecar) -> None:
    """Tokens are stateless: forty minted at once are distinct and each one is accepted."""
    tokens = await asyncio.gather(*(token_for(sidecar) for _ in range(40)))
    assert len(set(tokens)) == 40
    answers = await asyncio.gather(
        *(get(sidecar, "/latest/meta-data/placement/region", t) for t in tokens)
    )
    assert {(a.status, a.body) for a in answers} == {(200, "us-east-1")}


async def test_imds_v1_allowed_serves_without_token_but_still_checks_one(
    start_sidecar: SidecarFactory,
) -> None:
    """With imds_v1="allow" a tokenless GET works; a bad token is still 401, as on EC2."""
    sidecar = await start_sidecar("acme", "v1-task", imds_v1="allow")
    answer = await call("GET", sidecar.imds_url + CREDS)
    assert (answer.status, answer.body) == (200, ROLE)
    bad = await call("GET", sidecar.imds_url + CREDS, {TOKEN: "forged"})
    assert_aws_error(bad, 401, "Unauthorized")


# --- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CREDS, CREDS.rstrip("/")])
async def test_role_listing_is_exactly_one_name(sidecar: Sidecar, path: str) -> None:
    """The listing is the bare role name, no newline: botocore uses the whole body as the name."""
    answer = await get(sidecar, path)
    assert (answer.status, answer.body) == (200, ROLE)
    assert answer.headers["Content-Type"] == "text/plain"


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_credentials_document_has_ec2_fields(sidecar: Sidecar, suffix: str) -> None:
    """The role's document: EC2's fields, `Type` AWS-HMAC, timestamps `YYYY-MM-DDTHH:MM:SSZ`."""
    answer = await get(sidecar, CREDS + ROLE + suffix)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/plain"
    document = json.loads(answer.body)
    assert list(document) == [
        "Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration",
    ]  # fmt: skip
    assert (document["Code"], document["Type"]) == ("Success", "AWS-HMAC")
    assert TIMESTAMP.match(document["LastUpdated"])
    assert TIMESTAMP.match(document["Expiration"])
    assert document["AccessKeyId"].startswith("ASIA")
    assert document["SecretAccessKey"]
    assert document["Token"]
    expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    assert (expiration.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() > 900


@pytest.mark.parametrize("role", ["globex-app", "host-role", "ACME-APP"])
async def test_other_role_is_404(sidecar: Sidecar, role: str) -> None:
    """Only the task's own role has a document; any other name is EC2's 404 page."""
    assert_aws_error(await get(sidecar, CREDS + role), 404, "Not Found")


EXTENDED = "/latest/meta-data/iam/security-credentials-extended/"


@pytest.mark.parametrize("path", [EXTENDED, EXTENDED.rstrip("/")])
async def test_extended_listing_is_exactly_one_name(sidecar: Sidecar, path: str) -> None:
    """security-credentials-extended/ lists the bare role name, as security-credentials/ does."""
    answer = await get(sidecar, path)
    assert (answer.status, answer.body) == (200, ROLE)
    assert answer.headers["Content-Type"] == "text/plain"


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_extended_document_adds_the_account_id(sidecar: Sidecar, suffix: str) -> None:
    """The extended document: the legacy fields, then `AccountId`, the same credentials."""
    answer = await get(sidecar, EXTENDED + ROLE + suffix)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/plain"
    document = json.loads(answer.body)
    assert list(document) == [
        "Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration",
        "AccountId",
    ]  # fmt: skip
    assert (document["Code"], document["AccountId"]) == ("Success", "111111111111")
    assert TIMESTAMP.match(document["Expiration"])
    legacy = json.loads((await get(sidecar, CREDS + ROLE)).body)
    assert {k: v for k, v in document.items() if k != "AccountId"} == legacy


@pytest.mark.parametrize("path", [EXTENDED, EXTENDED + ROLE])
async def test_extended_path_without_a_token_is_401_when_v1_is_refused(
    sidecar: Sidecar, path: str
) -> None:
    """The extended path keeps the token rules: no token, IMDSv1 refused, 401."""
    assert_aws_error(await call("GET", sidecar.imds_url + path), 401, "Unauthorized")


@pytest.mark.parametrize("role", ["globex-app", "host-role", ROLE + "/extra"])
async def test_extended_other_role_is_404(sidecar: Sidecar, role: str) -> None:
    """Only the task's own role, under the extended path too; nothing is asked of the host."""
    assert_aws_error(await get(sidecar, EXTENDED + role), 404, "Not Found")


async def test_iam_listing_is_unchanged_by_the_extended_path(sidecar: Sidecar) -> None:
    """iam/ lists what it listed before: SDKs that do not know the extended path see no change."""
    assert (await get(sidecar, "/latest/meta-data/iam/")).body == "info\nsecurity-credentials/"


async def test_iam_info_names_the_instance_profile(sidecar: Sidecar) -> None:
    """iam/info carries Code, LastUpdated, InstanceProfileArn and InstanceProfileId."""
    answer = await get(sidecar, "/latest/meta-data/iam/info")
    info = json.loads(answer.body)
    assert list(info) == ["Code", "LastUpdated", "InstanceProfileArn", "InstanceProfileId"]
    assert info["Code"] == "Success"
    assert TIMESTAMP.match(info["LastUpdated"])
    assert info["InstanceProfileArn"] == "arn:aws:iam::111111111111:instance-profile/acme-app"
    assert re.fullmatch(r"AIPA[0-9A-Z]{17}", info["InstanceProfileId"])


# --- the metadata tree -----------------------------------------------------------------------


async def test_directories_list_one_entry_per_line(sidecar: Sidecar) -> None:
    """Listings: one entry a line, `/` on directories, none on leaves, no trailing newline."""
    root = (await get(sidecar, "/")).body.split("\n")
    assert "latest" in root
    assert "2021-03-23" in root
    assert (await get(sidecar, "/latest/")).body == "dynamic\nmeta-data"
    meta = (await get(sidecar, "/latest/meta-data/")).body.split("\n")
    assert {"iam/", "placement/", "instance-id", "local-ipv4", "mac"} <= set(meta)
    assert "user-data" not in meta
    placement = await get(sidecar, "/latest/meta-data/placement")
    assert placement.body == "availability-zone\navailability-zone-id\nregion"
    assert (await get(sidecar, "/latest/meta-data/iam/")).body == "info\nsecurity-credentials/"
    assert (await get(sidecar, "/latest/dynamic/")).body == "instance-identity/"


async def test_task_scoped_view(sidecar: Sidecar) -> None:
    """instance-id, placement, addresses and names describe the task, in EC2's formats."""
    token = await token_for(sidecar)

    async def leaf(name: str) -> str:
        answer = await get(sidecar, "/latest/meta-data/" + name, token)
        assert answer.status == 200, name
        assert answer.headers["Content-Type"] == "text/plain"
        return answer.body

    assert re.fullmatch(r"i-[0-9a-f]{17}", await leaf("instance-id"))
    assert await leaf("placement/region") == "us-east-1"
    assert await leaf("placement/availability-zone") == "us-east-1a"
    assert await leaf("placement/availability-zone-id") == "use1-az1"
    assert await leaf("local-ipv4") == "127.0.0.1"
    assert await leaf("hostname") == "ip-127-0-0-1.ec2.internal"
    assert await leaf("local-hostname") == "ip-127-0-0-1.ec2.internal"
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", await leaf("mac"))


async def test_leaf_paths_accept_a_trailing_slash(sidecar: Sidecar) -> None:
    """botocore's region fetcher asks for `placement/availability-zone/` with the slash."""
    answer = await get(sidecar, "/latest/meta-data/placement/availability-zone/")
    assert (answer.status, answer.body) == (200, "us-east-1a")


async def test_dated_versions_serve_the_same_tree(sidecar: Sidecar) -> None:
    """A dated API version answers like `latest`."""
    assert (await get(sidecar, "/2021-03-23/meta-data/placement/region")).body == "us-east-1"


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/no-such-thing",
        "/latest/meta-data/instance-id/extra",
        "/1999-01-01/meta-data/",
        "/latest/user-data",
        "/latest/meta-data/public-keys/0/openssh-key",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/meta-data/iam/security-credentials/acme-app/extra",
    ],
)
async def test_unknown_and_host_paths_are_404(sidecar: Sidecar, path: str) -> None:
    """Unknown paths, user-data and host-revealing paths: EC2's XHTML 404."""
    assert_aws_error(await get(sidecar, path), 404, "Not Found")


async def test_identity_document_is_signed_by_the_broker(
    sidecar: Sidecar, pki: Pki, tmp_path: Path
) -> None:
    """The task's identity document verifies against the broker's document key, in Python
    and with `metaproxy identity verify-document`, and describes this task."""
    token = await token_for(sidecar)
    document = await get(sidecar, "/latest/dynamic/instance-identity/document", token)
    signature = await get(sidecar, "/latest/dynamic/instance-identity/signature", token)
    assert document.headers["Content-Type"] == "text/plain"
    assert verify_document(pki.document_jwks, document.body, signature.body)
    assert not verify_document(pki.document_jwks, document.body.replace("1", "2"), signature.body)
    facts = json.loads(document.body)
    instance_id = (await get(sidecar, "/latest/meta-data/instance-id", token)).body
    assert (facts["instanceId"], facts["taskId"], facts["tenant"]) == (
        instance_id,
        "task-1",
        "acme",
    )
    assert (facts["region"], facts["availabilityZone"]) == ("us-east-1", "us-east-1a")
    (tmp_path / "doc").write_text(document.body)
    (tmp_path / "sig").write_text(signature.body)
    argv = [sys.executable, "-m", "metaproxy", "identity", "verify-document"]
    argv += ["--key-file", str(pki.document_jwks), "--document", str(tmp_path / "doc")]
    rc, _out, err = await run_command(
        *argv, "--signature", str(tmp_path / "sig"), env=dict(os.environ)
    )
    assert rc == 0, err


# --- host passthrough ------------------------------------------------------------------------


@dataclass
class FakeHostImds:
    """A host IMDS on loopback that requires IMDSv2 and records every path it was asked for."""

    asked: list[str] = field(default_factory=list)
    token: str = "host-token-1"
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/{tail:.*}", self._get)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        assert "X-Forwarded-For" not in request.headers
        return web.Response(text=self.token, headers={TTL: request.headers[TTL]})

    async def _get(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        if request.headers.get(TOKEN) != self.token:
            return web.Response(status=401)
        bodies = {
            "/latest/meta-data/ami-launch-index": "0",
            "/latest/meta-data/iam/security-credentials/host-role": '{"SecretAccessKey": "HOST"}',
            "/latest/meta-data/iam/security-credentials/": "host-role",
            "/latest/user-data": "#!/bin/sh\nexport DB_PASSWORD=host-secret",
            "/latest/meta-data/big": "x" * 70_000,
            "/latest/meta-data/spot/instance-action": '{"action": "stop"}',
        }
        body = bodies.get(request.path)
        return web.Response(text=body) if body is not None else web.Response(status=404)


@pytest.fixture
async def host_imds(aiohttp_server: Any) -> FakeHostImds:
    fake = FakeHostImds()
    fake.server = await aiohttp_server(fake.app())
    return fake


@pytest.fixture
async def passthrough_sidecar(start_sidecar: SidecarFactory, host_imds: FakeHostImds) -> Any:
    """A sidecar whose allow-list tries to let everything through, secrets included."""
    assert host_imds.server is not None
    allow = ("meta-data/ami-launch-index", "meta-data/", "meta-data/iam/", "user-data", "dynamic")
    return await start_sidecar(
        "acme",
        "pass-1",
        host_metadata_url=str(host_imds.server.make_url("/")),
        host_metadata_allow=allow,
    )


async def test_allow_listed_host_path_comes_through_with_a_host_token(
    passthrough_sidecar: Sidecar, host_imds: FakeHostImds
) -> None:
    """An allow-listed host path is fetched with an IMDSv2 token and served as text/plain."""
    answer = await get(passthrough_sidecar, "/latest/meta-data/ami-launch-index")
    assert (answer.status, answer.body) == (200, "0")
    assert answer.headers["Content-Type"] == "text/plain"
    spot = await get(passthrough_sidecar, "/latest/meta-data/spot/instance-action")
    assert json.loads(spot.body) == {"action": "stop"}


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/security-credentials/host-role",
        "/latest/meta-data/IAM/security-credentials/host-role",
        "/latest/meta-data//iam/security-credentials/host-role",
        "/latest/user-data",
        "/latest/dynamic/instance-identity/pkcs7",
    ],
)
async def test_host_secrets_never_come_through_even_if_allow_listed(
    passthrough_sidecar: Sidecar, host_imds: FakeHostImds, path: str
) -> None:
    """The host's role credentials and user-data are 404 and never even requested from it."""
    answer = await get(passthrough_sidecar, path)
    assert_aws_error(answer, 404, "Not Found")
    assert "HOST" not in answer.body
    secret = ("iam", "user-data", "dynamic", "identity-credentials", "public-keys")
    assert [p for p in host_imds.asked if any(word in p.lower() for word in secret)] == []


async def test_encoded_traversal_never_reaches_the_host(
    passthrough_sidecar: Sidecar, host_imds: FakeHostImds
) -> None:
    """`..` and percent-encoded slashes cannot walk from an allowed prefix to user-data."""
    token = await token_for(passthrough_sidecar)
    for raw in (
        "/latest/meta-data/ami-launch-index/../../user-data",
        "/latest/meta-data/%2E%2E/user-data",
        "/latest/meta-data/..%2F..%2Fuser-data",
    ):
        answer = await call("GET", passthrough_sidecar.imds_url + raw, {TOKEN: token}, encoded=True)
        assert answer.status == 404, raw
    assert not any("user-data" in p for p in host_imds.asked)


async def test_host_answers_are_cached_and_capped(
    passthrough_sidecar: Sidecar, host_imds: FakeHostImds
) -> None:
    """Repeated reads of a host path ask the host once; an oversized answer is refused."""
    token = await token_for(passthrough_sidecar)
    for _ in range(5):
        answer = await get(passthrough_sidecar, "/latest/meta-data/ami-launch-index", token)
        assert answer.body == "0"
    assert host_imds.asked.count("/latest/meta-data/ami-launch-index") == 1
    assert_aws_error(
        await get(passthrough_sidecar, "/latest/meta-data/big", token), 404, "Not Found"
    )


async def test_host_token_is_refreshed_after_a_host_401(
    passthrough_sidecar: Sidecar, host_imds: FakeHostImds
) -> None:
    """When the host forgets its token (it restarted), the sidecar gets a new one and retries."""
    assert (await get(passthrough_sidecar, "/latest/meta-data/ami-launch-index")).body == "0"
    host_imds.token = "host-token-2"
    answer = await get(passthrough_sidecar, "/latest/meta-data/spot/instance-action")
    assert answer.status == 200


async def test_paths_outside_the_allow_list_never_reach_the_host(
    start_sidecar: SidecarFactory, host_imds: FakeHostImds
) -> None:
    """Only allow-listed paths are asked of the host; `ami` does not allow `ami-launch-index`."""
    assert host_imds.server is not None
    sidecar = await start_sidecar(
        "acme",
        "narrow-1",
        host_metadata_url=str(host_imds.server.make_url("/")),
        host_metadata_allow=("meta-data/ami",),
    )
    assert_aws_error(await get(sidecar, "/latest/meta-data/ami-launch-index"), 404, "Not Found")
    assert host_imds.asked == []


@pytest.mark.parametrize(
    ("path", "allow", "expected"),
    [
        ("meta-data/ami-launch-index", ("meta-data/ami-launch-index",), True),
        ("meta-data/ami-launch-index/", ("meta-data/ami-launch-index",), True),
        ("meta-data/spot/instance-action", ("meta-data/spot/",), True),
        ("meta-data/ami-launch-index", ("meta-data/ami",), False),
        ("meta-data/iam/security-credentials/host-role", ("meta-data/",), False),
        ("meta-data/Iam/info", ("meta-data/",), False),
        ("meta-data/identity-credentials/ec2/info", ("meta-data/",), False),
        ("meta-data/public-keys/0", ("meta-data/",), False),
        ("user-data", ("user-data",), False),
        ("dynamic/instance-identity/document", ("dynamic/",), False),
        ("meta-data/../user-data", ("meta-data/",), False),
        ("meta-data/.hidden", ("meta-data/",), False),
        ("meta-data/a b", ("meta-data/",), False),
        ("meta-data/ami-launch-index", (), False),
    ],
)
def test_permitted_normalises_and_denies_before_allowing(
    path: str, allow: tuple[str, ...], expected: bool
) -> None:
    """The allow-list matches whole segments; the deny-list and odd segments always win."""
    assert permitted(path, allow) is expected


# --- credential rotation ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def own_broker_and_sidecar(
    tmp: Path,
    pki: Pki,
    sts_url: str,
    policies_dir: Path,
    broker_overrides: dict[str, Any],
    **sidecar_overrides: Any,
) -> AsyncIterator[Sidecar]:
    """A broker configured for one test (the shared fixture's defaults do not fit), and an
    acme sidecar in front of it."""
    tmp.mkdir(parents=True, exist_ok=True)
    broker = await BrokerServer.start(
        broker_config(tmp, pki, sts_url, policies_dir, **broker_overrides)
    )
    token_file = tmp / "task.jwt"
    token_file.write_text(issue(pki, "own-1", "acme"))
    sidecar = Sidecar(sidecar_config(tmp, pki, broker.url, token_file, **sidecar_overrides))
    await sidecar.start()
    try:
        await wait_ready(sidecar.admin_url)
        yield sidecar
    finally:
        await sidecar.aclose()
        await broker.aclose()


@pytest.mark.slow
async def test_sidecar_rotates_before_serving_inside_min_serve_window(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """With min_serve_seconds=3590 and 3600 s credentials, every document served has at least
    3590 s left, and the sidecar moves on to new credential sets instead of ageing the first.

    STS will not issue less than 900 s, so the window is widened instead; the broker's own cache
    is turned off (cache_refresh_fraction=0) so that each refresh reaches STS."""
    async with own_broker_and_sidecar(
        tmp_path / "rotation",
        pki,
        sts_url,
        policies_dir,
        {"cache_refresh_fraction": 0.0},
        min_serve_seconds=3590.0,
    ) as sidecar:
        token = await token_for(sidecar)
        seen: list[str] = []
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            document = json.loads((await get(sidecar, CREDS + ROLE, token)).body)
            expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
            left = (expiration.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
            # 1 s for whole-second timestamps, 2 s for a loaded machine: a refresh that takes
            # longer than the 0.5 s a client is made to wait lands on the next request.
            assert left >= 3587, left
            seen.append(document["AccessKeyId"])
            await asyncio.sleep(0.2)
        assert len(set(seen)) >= 2, seen
        assert sidecar.state.keeper.refreshes >= 2
