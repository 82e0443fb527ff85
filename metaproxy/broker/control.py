"""The control API: the only HTTP surface that changes the broker's state (revocations).

Its own listener (`--control-listen`), TLS with the broker's certificate, and a bearer token
read from `--control-token-file`, compared in constant time. Every request, refused ones
included, is audited: a control token is an operator's credential and its misuse must show.
The admin port (`/healthz`, `/readyz`, `/metrics`) changes nothing, so the NetworkPolicy that
opens it to the monitoring namespace no longer opens a way to revoke (or un-revoke) anyone.

    GET  /v1/revocations              every revocation in force
    POST /v1/revocations              {"tenant": T} or {"tenant": T, "task": ID}
    POST /v1/revocations/lift         the same body: take the revocation back
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.http_api import bearer_token
from metaproxy.broker.revocation import revocation_scope
from metaproxy.broker.revoke import Revoker
from metaproxy.errors import BadRequest, ConfigError, NotFound, Unauthenticated
from metaproxy.logs import request_id_var
from metaproxy.net.httperrors import Handler, json_errors

log = logging.getLogger("metaproxy.broker.control")

MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16


class ControlToken:
    """The control bearer token, re-read when its file changes (a rotated Secret).

    A change is any of mtime, size or inode (Kubernetes swaps a `..data` symlink atomically,
    possibly within one mtime tick). A file emptied, cut short or removed after the start is an
    operator taking the token away: from then on every request is refused (fail closed), never
    answered with the token read before."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._state: tuple[int, int, int] | None = None
        self._token: bytes | None = None
        self._token, self._state = self._read()  # at start, a problem is a ConfigError

    def _read(self) -> tuple[bytes, tuple[int, int, int]]:
        try:
            stat = self._path.stat()
            raw = self._path.read_bytes()[:MAX_TOKEN_BYTES].strip()
        except OSError as exc:
            raise ConfigError(
                f"control_token_file: cannot read {self._path}: {exc.strerror}"
            ) from None
        if len(raw) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"control_token_file: {self._path} holds fewer than {MIN_TOKEN_CHARS} characters"
            )
        return raw, (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _current(self) -> bytes | None:
        try:
            stat = self._path.stat()
            state = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            state = None
        if state is not None and state == self._state:
            return self._token
        try:
            self._token, self._state = self._read()
        except ConfigError as exc:
            if self._token is not None:
                log.error("%s; refusing every control request until it holds a token", exc.detail)
            self._token, self._state = None, state
        return self._token

    def matches(self, offered: str | None) -> bool:
        token = self._current()
        if not offered or token is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token)


CONTROL_TOKEN = web.AppKey("control_token", ControlToken)
REVOKER = web.AppKey("revoker", Revoker)


def _context(request: web.Request) -> RequestContext:
    return RequestContext(request_id_var.get(), request.remote or "unix")


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = bearer_token(request.headers.get("Authorization"))
    if request.app[CONTROL_TOKEN].matches(token):
        return await handler(request)
    reason = "no control token" if token is None else "wrong control token"
    refusal = Unauthenticated(
        f"{request.method} {request.path[:100]}: {reason}", public_message="control token required"
    )
    await request.app[REVOKER].refused(refusal, _context(request))
    raise refusal


async def _body(request: web.Request) -> tuple[str, str]:
    if request.content_type != "application/json":
        raise BadRequest(public_message="Content-Type must be application/json")
    try:
        body: Any = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest(public_message="body is not valid JSON") from None
    if not isinstance(body, dict) or not set(body) <= {"tenant", "task"} or "tenant" not in body:
        raise BadRequest(public_message='body must be {"tenant": NAME} or {"tenant", "task"}')
    tenant, task = body["tenant"], body.get("task", "")
    for field, value in (("tenant", tenant), ("task", task)):
        if not isinstance(value, str) or len(value) > 256 or not value.isprintable():
            raise BadRequest(public_message=f"{field} must be a string of printable characters")
    if not tenant or (task == "" and "task" in body):
        raise BadRequest(public_message="tenant and task must not be empty")
    if not request.app[REVOKER].knows(tenant):
        # A name no policy knows is a typo, not a success: revoking it would protect nothing.
        raise NotFound(f"no policy for tenant {tenant!r}", public_message="unknown tenant")
    return tenant, task


async def post_revocation(request: web.Request) -> web.Response:
    tenant, task = await _body(request)
    answer = await request.app[REVOKER].revoke(tenant, task, _context(request))
    return web.json_response(answer)


async def post_lift(request: web.Request) -> web.Response:
    tenant, task = await _body(request)
    answer = await request.app[REVOKER].lift(tenant, task, _context(request))
    if answer is None:
        raise NotFound(
            f"{revocation_scope(tenant, task)} is not revoked", public_message="no such revocation"
        )
    return web.json_response(answer)


async def get_revocations(request: web.Request) -> web.Response:
    listing = await request.app[REVOKER].listing(_context(request))
    return web.json_response(
        {
            "revocations": [
                {"tenant": e.tenant, "task": e.task, "at": e.at, "by": e.by}
                for e in listing.revocations
            ],
            "view_age_seconds": round(listing.view_age_seconds, 3),
            "stale": listing.stale,
        }
    )


def build_control_app(revoker: Revoker, token: ControlToken) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_token], client_max_size=4096)
    app[REVOKER] = revoker
    app[CONTROL_TOKEN] = token
    app.router.add_get("/v1/revocations", get_revocations)
    app.router.add_post("/v1/revocations", post_revocation)
    app.router.add_post("/v1/revocations/lift", post_lift)
    return app
