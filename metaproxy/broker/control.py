"""The control API: the only HTTP surface that changes the broker's state (revocations).

Its own listener (`--control-listen`), TLS with the broker's certificate, and bearer tokens
read from `--control-tokens` (one per operator) or `--control-token-file` (one shared),
compared in constant time (`control_tokens.py`). Every request, refused ones included, is
audited, with the operator whose token it carried: a control token is an operator's
credential and its misuse must show.
The admin port (`/healthz`, `/readyz`, `/metrics`) changes nothing, so the NetworkPolicy that
opens it to the monitoring namespace no longer opens a way to revoke (or un-revoke) anyone.

    GET  /v1/revocations              every revocation in force
    POST /v1/revocations              {"tenant": T} or {"tenant": T, "task": ID}
    POST /v1/revocations/lift         the same body: take the revocation back
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.control_tokens import ControlToken, ControlTokens
from metaproxy.broker.http_api import bearer_token
from metaproxy.broker.revocation import revocation_scope
from metaproxy.broker.revoke import Revoker
from metaproxy.errors import BadRequest, NotFound, Unauthenticated
from metaproxy.logs import request_id_var
from metaproxy.net.httperrors import Handler, json_errors

log = logging.getLogger("metaproxy.broker.control")

__all__ = ["ControlToken", "ControlTokens", "build_control_app"]

CONTROL_TOKEN = web.AppKey("control_token", ControlTokens)
REVOKER = web.AppKey("revoker", Revoker)
OPERATOR = web.RequestKey("operator", str)  # the name the request's token carried


def _context(request: web.Request) -> RequestContext:
    return RequestContext(
        request_id_var.get(), request.remote or "unix", operator=request.get(OPERATOR, "")
    )


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = bearer_token(request.headers.get("Authorization"))
    operator = request.app[CONTROL_TOKEN].operator(token)
    if operator is not None:
        request[OPERATOR] = operator
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


def build_control_app(revoker: Revoker, token: ControlTokens) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_token], client_max_size=4096)
    app[REVOKER] = revoker
    app[CONTROL_TOKEN] = token
    app.router.add_get("/v1/revocations", get_revocations)
    app.router.add_post("/v1/revocations", post_revocation)
    app.router.add_post("/v1/revocations/lift", post_lift)
    return app
