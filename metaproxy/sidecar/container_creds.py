"""The container-credentials API (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).

SDKs send the token from `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]` as the `Authorization`
header; botocore rejects a token containing `\\r` or `\\n`, so the token file has no newline.
The JS SDK gives up after 1 s, so this path never waits on the broker for long.
"""

from __future__ import annotations

import base64
import errno
import hmac
import json
import logging
import os
import stat
from collections.abc import Awaitable
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy.clock import iso_z
from metaproxy.connguard import canned_response
from metaproxy.errors import ConfigError
from metaproxy.fsutil import write_atomically
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.http1 import REASONS, Request, Response

if TYPE_CHECKING:
    from metaproxy.sidecar.state import SidecarState

log = logging.getLogger("metaproxy.sidecar")

CREDENTIALS_PATH = "/v1/credentials"


def json_error(status: int, code: str, message: str, **headers: str) -> Response:
    body = json.dumps({"Code": code, "Message": message}).encode()
    return Response(status, body, "application/json", tuple(headers.items()))


def load_or_create_token(path: Path | None, mode: int = 0o600) -> str:
    """The task's authorization token: kept if the platform wrote one, else made; either way the
    file ends up holding exactly the token, no trailing newline, because SDKs send the file's
    bytes verbatim as the header.

    The task can write to the token's directory, so it can plant a link there: a root sidecar
    once followed one, copied a root-only file into the task's directory and made it 0644. So the
    file is read without following a link (and only if it is a regular file), and written as a
    new file (never through a link) renamed over whatever is there, with `mode`."""
    token = ""
    if path is not None:
        written = _read_regular_file(path)
        token = written.strip()
        if not token.isprintable():  # several lines or control characters: not a header value
            token = ""
        elif token and token == written and _has_mode(path, mode):
            return token
    token = token or _random_token()
    if path is not None:
        if path.parent.is_symlink():
            raise ConfigError(f"--authorization-token-file: {path.parent} is a symbolic link")
        write_atomically(path, token.encode(), mode)
    return token


_MAX_TOKEN_FILE = 4096


def _random_token() -> str:
    """`secrets.token_urlsafe(32)`, spelled out: `secrets` imports `random` (the Mersenne
    Twister, `bisect`, a SHA-512), a fifth of a megabyte of every pod for one call (issue 13)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


def _read_regular_file(path: Path) -> str:
    """The file's text, or "" when it is absent, a link, not a regular file, too large for a
    token, or not text: whatever it is, it will be replaced."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted FIFO
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("%s is a symbolic link; replacing it with a new token file", path)
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_TOKEN_FILE:
            return ""
        return os.read(fd, _MAX_TOKEN_FILE).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    finally:
        os.close(fd)


def _has_mode(path: Path, mode: int) -> bool:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode) == mode
    except OSError:
        return False


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
    return state.container_document(grant)


async def _after_refresh(state: SidecarState) -> Response:
    grant = await state.keeper.fresh(wait=0.5)
    if grant is None:
        return json_error(
            503, "CredentialsUnavailable", "no valid credentials yet; retry", **{"Retry-After": "1"}
        )
    return state.container_document(grant)


def render_document(grant: Grant) -> Response:
    """The credential document; `SidecarState.container_document` keeps the current one."""
    creds = grant.credentials
    document = {
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "Expiration": iso_z(creds.expiration),
        "AccountId": grant.account_id,
        "RoleArn": grant.role_arn,
    }
    return Response(200, json.dumps(document).encode(), "application/json")


CREDENTIALS = RateClass("container", attrgetter("credentials_rps"))


def error_page(status: int) -> Response:
    code = "BadRequest" if status < 500 else "InternalError"
    return json_error(status, code, REASONS.get(status, ""))


FACE = Face(
    name="container",
    handle=handle,
    rate_class=lambda _path: CREDENTIALS,
    error_page=error_page,
    too_many=lambda retry: json_error(
        429, "TooManyRequests", "rate limit exceeded", **{"Retry-After": str(retry)}
    ),
    refused=json_error(403, "Forbidden", "request refused"),
    over_connection_cap=canned_response(
        429,
        "Too Many Requests",
        json.dumps({"Code": "TooManyRequests", "Message": "too many connections"}).encode(),
        "application/json",
    ),
)
