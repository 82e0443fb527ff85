"""The container-credentials API (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).

SDKs send the token from `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]` as the `Authorization`
header; botocore rejects a token containing `\\r` or `\\n`, so the token file has no newline.
The JS SDK gives up after 1 s, so this path never waits on the broker for long.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from aiohttp import web

from metaproxy.clock import iso_z
from metaproxy.sidecar.state import STATE

CREDENTIALS_PATH = "/v1/credentials"


def json_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"Code": code, "Message": message}),
        content_type="application/json",
        headers=headers or None,
    )


def load_or_create_token(path: Path | None) -> str:
    """The task's authorization token: kept if the platform wrote one, else made; either way the
    file ends up holding exactly the token, no trailing newline (atomically, readable by the
    app's user), because SDKs send the file's bytes verbatim as the header."""
    token = ""
    if path is not None and path.exists():
        written = path.read_text()
        token = written.strip()
        if not token.isprintable():  # several lines or control characters: not a header value
            token = ""
        elif token and token == written:
            return token
    token = token or secrets.token_urlsafe(32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(token)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    return token


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if request.path != CREDENTIALS_PATH:
        return json_error(404, "NotFound", "no such path")
    if request.method not in ("GET", "HEAD"):
        return json_error(405, "MethodNotAllowed", "use GET", Allow="GET, HEAD")
    supplied = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(supplied, state.authorization_token.encode()):
        return json_error(401, "AccessDenied", "Authorization header missing or wrong")
    grant = await state.keeper.fresh(wait=0.5)
    if grant is None:
        return json_error(
            503, "CredentialsUnavailable", "no valid credentials yet; retry", **{"Retry-After": "1"}
        )
    creds = grant.credentials
    document = {
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "Expiration": iso_z(creds.expiration),
        "AccountId": grant.account_id,
        "RoleArn": grant.role_arn,
    }
    return web.Response(text=json.dumps(document), content_type="application/json")
