"""The broker's public HTTP surface: `POST /v1/credentials`, one handler over the issuer.

The handler parses the request strictly, asks the `Issuer`, and serialises its `Issued` answer
(`Answers`); errors become JSON with a public message and the request id (`json_errors`).
"""

from __future__ import annotations

import json

from aiohttp import web

from metaproxy.broker import instrument
from metaproxy.broker.answer import Answers
from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.issuer import CredentialRequest, Issuer
from metaproxy.broker.metrics import BrokerMetrics
from metaproxy.errors import BadRequest
from metaproxy.logs import request_id_var
from metaproxy.net.httperrors import identity_encoding_only, json_errors
from metaproxy.net.webguard import body_deadline

ISSUER = web.AppKey("issuer", Issuer)
ANSWERS = web.AppKey("answers", Answers)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None for anything else."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def post_credentials(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise BadRequest(public_message="Content-Type must be application/json")
    raw = await request.read()
    try:
        body: object = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…
        raise BadRequest(public_message="body is not valid JSON") from None
    credential_request = CredentialRequest.from_json(body)
    ctx = RequestContext(request_id_var.get(), request.remote or "unix")
    token = bearer_token(request.headers.get("Authorization"))
    issued = await request.app[ISSUER].issue(token, credential_request, ctx)
    instrument.note_origin(request, issued.fetched.origin)
    body_json = request.app[ANSWERS].render(issued)
    return web.json_response(body_json, headers={"Cache-Control": "no-store"})


def build_public_app(
    issuer: Issuer,
    answers: Answers,
    metrics: BrokerMetrics,
    *,
    max_body_bytes: int,
    header_timeout: float,
) -> web.Application:
    app = web.Application(
        middlewares=[
            json_errors,
            identity_encoding_only,
            instrument.request_metrics,
            body_deadline(header_timeout),
        ],
        client_max_size=max_body_bytes,
    )
    app[ISSUER] = issuer
    app[ANSWERS] = answers
    app[instrument.METRICS] = metrics
    app.router.add_post("/v1/credentials", post_credentials)
    return app
