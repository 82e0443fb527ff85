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
from collections.abc import Awaitable
from pathlib import Path

from metaproxy.clock import iso_z
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.http1 import Request, Response
from metaproxy.sidecar.state import SidecarState

CREDENTIALS_PATH = "/v1/credentials"


def json_error(status: int, code: str, message: str, **headers: str) -> Response:
    body = json.dumps({"Code": code, "Message": message}).encode()
    return Response(status, body, "application/json", tuple(headers.items()))


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


def handle(state: SidecarState, request: Request) -> Response | Awaitable[Response]:
    if request.path != CREDENTIALS_PATH:
        return json_error(404, "NotFound", "no such path")
    if request.method not in ("GET", "HEAD"):
        return json_error(405, "MethodNotAllowed", "use GET", Allow="GET, HEAD")
    supplied = request.headers.get("authorization", "").encode("latin-1", "replace")
    if "authorization" in request.duplicate_headers or not hmac.compare_digest(
        supplied, state.authorization_token.encode()
    ):
        return json_error(401, "AccessDenied", "Authorization header missing or wrong")
    grant = state.keeper.serving()
    if grant is None:  # none yet, or inside the 15-minute window: wait briefly for fresh ones
        return _after_refresh(state)
    return document_response(grant)


async def _after_refresh(state: SidecarState) -> Response:
    grant = await state.keeper.fresh(wait=0.5)
    if grant is None:
        return json_error(
            503, "CredentialsUnavailable", "no valid credentials yet; retry", **{"Retry-After": "1"}
        )
    return document_response(grant)


_rendered: tuple[Grant, Response] | None = None


def document_response(grant: Grant) -> Response:
    """Rendered once per credential set (a one-entry cache: grants change every half hour)."""
    global _rendered  # noqa: PLW0603
    if _rendered is not None and _rendered[0] is grant:
        return _rendered[1]
    creds = grant.credentials
    document = {
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "Expiration": iso_z(creds.expiration),
        "AccountId": grant.account_id,
        "RoleArn": grant.role_arn,
    }
    response = Response(200, json.dumps(document).encode(), "application/json")
    _rendered = (grant, response)
    return response
