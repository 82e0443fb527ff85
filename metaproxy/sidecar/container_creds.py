"""The container-credentials API, in both of its shapes.

- ECS's, `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`: every SDK since 2016 fetches
  `http://169.254.170.2` + that path with no header at all, so the path itself is the task's
  secret (`--container-credentials-path`, e.g. `/v2/credentials/<random>`), served on every
  container listener. SDKs that predate the token-file variable (botocore 1.29, AWS CLI 2.9,
  aws-sdk-go 1.44, Ruby 3.168) get credentials this way, or through a FULL_URI that carries
  the same secret path.
- `AWS_CONTAINER_CREDENTIALS_FULL_URI` + `/v1/credentials`: SDKs send the token of
  `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]` as the `Authorization` header; botocore rejects a
  token containing `\\r` or `\\n`, so the token file has no newline.

A request that carries neither the secret path nor the token gets no credentials: an SSRF that
makes the application fetch a URL of the attacker's choosing cannot guess either. The JS SDK
gives up after 1 s, so this path never waits on the broker for long. Answers are ECS's: compact
JSON, no `Server` header.
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
from metaproxy.errors import ConfigError
from metaproxy.fsutil import write_atomically
from metaproxy.net.connguard import canned_response
from metaproxy.sidecar.broker_client import Grant
from metaproxy.sidecar.face import Face, RateClass
from metaproxy.sidecar.wire.messages import REASONS, Request, Response

if TYPE_CHECKING:
    from metaproxy.sidecar.state import SidecarState

log = logging.getLogger("metaproxy.sidecar")

CREDENTIALS_PATH = "/v1/credentials"


def json_error(status: int, code: str, message: str, **headers: str) -> Response:
    """An error as ECS's agent writes one: `{"code", "message"}` as `application/json` (the
    exact type aws-sdk-go-v2 wants before it reads the code)."""
    body = json.dumps({"code": code, "message": message}, separators=(",", ":")).encode()
    return Response(status, body, "application/json", tuple(headers.items()))


def throttled(retry_after: int, message: str) -> Response:
    """Over the pod's rate or connection cap, in the one form every SDK retries: 503 (botocore,
    the JS SDKs, Go, Rust, C++, object_store all retry it; Rust and aws-sdk-go-v2 1.17 give up
    on a 429), a throttling code (aws-sdk-go-v2 1.17 retries by the JSON code alone) and
    Retry-After (JS v2, aws-sdk-go and urllib3 wait for it)."""
    return json_error(503, "ThrottlingException", message, **{"Retry-After": str(retry_after)})


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


_NOT_FOUND = json_error(404, "NotFound", "no such path")
_NOT_ALLOWED = json_error(405, "MethodNotAllowed", "use GET", Allow="GET, HEAD")
_UNAUTHORIZED = json_error(401, "AccessDenied", "Authorization header missing or wrong")


def handle(state: SidecarState, request: Request) -> Response | Awaitable[Response]:
    kept = request.kept
    if kept is not None:
        # Answered before with the document of a grant that could be served: the same while
        # that grant is held, its document kept, and its serving stands as it stood.
        grant, document, serve_until = kept
        answer: Response = document
        if (
            state.keeper.grant is grant
            and state.container_document.value is answer
            and state.keeper.monotonic() < serve_until
        ):
            return answer
        request.kept = None
    path = request.path
    if path == CREDENTIALS_PATH:
        supplied = request.headers.get("authorization", "").encode("latin-1", "replace")
        authorized = "authorization" not in request.duplicate_headers and hmac.compare_digest(
            supplied, state.authorization_token.encode()
        )
    elif state.relative_path and hmac.compare_digest(
        path.encode("utf-8", "replace"), state.relative_path
    ):
        authorized = True  # the path is the secret (ECS's RELATIVE_URI carries no header)
    else:
        return _NOT_FOUND
    if request.method not in ("GET", "HEAD"):
        return _NOT_ALLOWED
    if not authorized:
        return _UNAUTHORIZED
    grant, serve_until = state.keeper.serving_until()
    if grant is None:  # none yet, or inside the 15-minute window: wait briefly for fresh ones
        return _after_refresh(state)
    document = state.container_document(grant)
    request.kept = (grant, document, serve_until)
    return document


async def _after_refresh(state: SidecarState) -> Response:
    grant = await state.keeper.fresh(wait=0.5)
    if grant is None:
        return json_error(
            503, "CredentialsUnavailable", "no valid credentials yet; retry", **{"Retry-After": "1"}
        )
    return state.container_document(grant)


def render_document(grant: Grant) -> Response:
    """The credential document, as ECS's agent writes it (compact, its key order, AccountId
    before Expiration); `SidecarState.container_document` keeps the current one."""
    creds = grant.credentials
    document = {
        "RoleArn": grant.role_arn,
        "AccessKeyId": creds.access_key_id,
        "SecretAccessKey": creds.secret_access_key,
        "Token": creds.session_token,
        "AccountId": grant.account_id,
        "Expiration": iso_z(creds.expiration),
    }
    return Response(200, json.dumps(document, separators=(",", ":")).encode(), "application/json")


CREDENTIALS = RateClass("container", attrgetter("credentials_rps"))


def error_page(status: int) -> Response:
    code = "BadRequest" if status < 500 else "InternalError"
    return json_error(status, code, REASONS.get(status, ""))


FACE = Face(
    name="container",
    handle=handle,
    rate_class=lambda _path: CREDENTIALS,
    server="",
    error_page=error_page,
    too_many=lambda retry: throttled(retry, "rate limit exceeded; retry"),
    refused=json_error(403, "Forbidden", "request refused"),
    over_connection_cap=canned_response(
        503,
        "Service Unavailable",
        json.dumps({"code": "ThrottlingException", "message": "too many connections"}).encode(),
        "application/json",
        retry_after=1,
    ),
)
