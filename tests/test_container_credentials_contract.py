"""The container-credentials endpoint answers as ECS and EKS Pod Identity do: at ECS's secret
relative path with no header (every SDK since 2016), and at /v1/credentials with the token."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metaproxy.sidecar.process import Sidecar
from tests.conftest import SidecarFactory

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


async def call(
    method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.text()


def auth_token(sidecar: Sidecar) -> str:
    path = sidecar.state.config.authorization_token_file
    assert path is not None
    return Path(path).read_text()


def assert_json_error(status: int, headers: dict[str, str], body: str, expected: int) -> Any:
    assert status == expected
    assert headers["Content-Type"] == "application/json"  # exactly: aws-sdk-go-v2 checks it
    error = json.loads(body)
    assert set(error) == {"code", "message"}  # ECS's agent's shape
    assert error["code"]
    assert error["message"]
    return error


SECRET_PATH = "/v2/credentials/" + "Zq3" * 10  # what the webhook would put in RELATIVE_URI


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory) -> Sidecar:
    return await start_sidecar("globex", "task-7", container_credentials_path=SECRET_PATH)


async def test_secret_relative_path_needs_no_header(sidecar: Sidecar) -> None:
    """ECS's relative URI: the secret path alone gets the credentials, as ECS's agent writes
    them (compact JSON in its key order, no Server header)."""
    status, headers, body = await call("GET", sidecar.container_url + SECRET_PATH)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert "Server" not in headers
    document = json.loads(body)
    assert list(document) == [
        "RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration",
    ]  # fmt: skip
    assert body == json.dumps(document, separators=(",", ":"))
    assert document["AccessKeyId"].startswith("ASIA")
    with_token = await call(
        "GET", sidecar.container_url + "/v1/credentials", {"Authorization": auth_token(sidecar)}
    )
    assert json.loads(with_token[2]) == document


@pytest.mark.parametrize(
    "path",
    [
        SECRET_PATH[:-1],
        SECRET_PATH + "x",
        SECRET_PATH + "/",
        SECRET_PATH.upper(),
        "/v2/credentials/",
        "/v2/credentials",
        SECRET_PATH.replace("/v2/", "/v1/"),
    ],
    ids=["truncated", "longer", "slash", "case", "prefix", "bare", "other-version"],
)
async def test_anything_but_the_exact_secret_path_is_404(sidecar: Sidecar, path: str) -> None:
    """Near misses of the secret get ECS's JSON 404 and no credentials, token or not."""
    headers = {"Authorization": auth_token(sidecar)}
    status, response_headers, body = await call("GET", sidecar.container_url + path, headers)
    assert_json_error(status, response_headers, body, 404)
    assert "AccessKeyId" not in body


async def test_secret_path_takes_only_get_and_head(sidecar: Sidecar) -> None:
    """The secret path is still a credentials document: other methods are 405."""
    status, headers, body = await call("POST", sidecar.container_url + SECRET_PATH)
    assert_json_error(status, headers, body, 405)


async def test_without_a_configured_path_only_the_token_works(
    start_sidecar: SidecarFactory,
) -> None:
    """A sidecar given no secret path serves none: /v2/credentials/… is 404."""
    plain = await start_sidecar("globex", "task-9")
    status, headers, body = await call("GET", plain.container_url + SECRET_PATH)
    assert_json_error(status, headers, body, 404)


async def test_credentials_document(sidecar: Sidecar) -> None:
    """200 application/json with the fields SDKs read, RFC 3339 expiry and the account id."""
    status, headers, body = await call(
        "GET", sidecar.container_url + "/v1/credentials", {"Authorization": auth_token(sidecar)}
    )
    assert status == 200
    assert headers["Content-Type"].split(";")[0] == "application/json"
    document = json.loads(body)
    assert {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "AccountId"} <= set(document)
    assert document["AccessKeyId"].startswith("ASIA")
    assert document["SecretAccessKey"]
    assert document["Token"]
    assert RFC3339.match(document["Expiration"])
    assert document["AccountId"] == "222222222222"
    assert document["RoleArn"] == "arn:aws:iam::222222222222:role/globex-app"


@pytest.mark.serial  # asserts answers within 0.5 s
async def test_answers_well_inside_one_second(sidecar: Sidecar) -> None:
    """The JS SDK gives up after 1 s; a warm sidecar answers in a small fraction of that."""
    headers = {"Authorization": auth_token(sidecar)}
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            started = time.monotonic()
            async with session.get(sidecar.container_url + "/v1/credentials", headers=headers) as r:
                assert r.status == 200
                await r.read()
            assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer x", "wrong-token", "t\u00e9st"],
    ids=["missing", "empty", "bearer", "wrong", "non-ascii"],
)
async def test_wrong_authorization_is_401_json(sidecar: Sidecar, authorization: str | None) -> None:
    """Without the task's exact token: 401, JSON Code/Message, and no credentials in the body."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    status, response_headers, body = await call(
        "GET", sidecar.container_url + "/v1/credentials", headers
    )
    error = assert_json_error(status, response_headers, body, 401)
    assert error["code"] == "AccessDenied"
    assert "AccessKeyId" not in body


async def test_token_with_appended_text_is_401(sidecar: Sidecar) -> None:
    """A prefix match is not enough: the whole header must equal the token."""
    headers = {"Authorization": auth_token(sidecar) + "x"}
    status, response_headers, body = await call(
        "GET", sidecar.container_url + "/v1/credentials", headers
    )
    assert_json_error(status, response_headers, body, 401)


async def test_unknown_path_and_method_are_json_errors(sidecar: Sidecar) -> None:
    """Other paths are 404 and other methods 405 with Allow, both as JSON Code/Message."""
    headers = {"Authorization": auth_token(sidecar)}
    status, response_headers, body = await call("GET", sidecar.container_url + "/v2/x", headers)
    assert_json_error(status, response_headers, body, 404)
    status, response_headers, body = await call(
        "POST", sidecar.container_url + "/v1/credentials", headers
    )
    assert_json_error(status, response_headers, body, 405)
    assert response_headers["Allow"] == "GET, HEAD"


async def test_token_file_has_no_trailing_newline(sidecar: Sidecar) -> None:
    """botocore refuses a token with CR/LF and Node refuses such a header: the file is bare."""
    token = auth_token(sidecar)
    assert token == token.strip()
    assert len(token) >= 32
    assert token == sidecar.state.authorization_token


async def test_platform_written_token_is_kept_but_its_newline_dropped(
    start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """A token the platform wrote with a trailing newline stays the token; the file loses the
    newline so SDKs reading it verbatim send a valid header."""
    token_file = tmp_path / "platform.auth"
    token_file.write_text("platform-chosen-token-0123456789\n")
    sidecar = await start_sidecar("globex", "task-8", authorization_token_file=token_file)
    assert token_file.read_text() == "platform-chosen-token-0123456789"
    status, _headers, _body = await call(
        "GET",
        sidecar.container_url + "/v1/credentials",
        {"Authorization": "platform-chosen-token-0123456789"},
    )
    assert status == 200
