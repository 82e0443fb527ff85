"""One place that turns errors into HTTP answers: JSON `{"code", "message", "request_id"}`,
and `"reason"` when the error has a category the client may see (a 401's `AuthReason`).

Clients get the public message only; the detail goes to the log. Unexpected exceptions are
logged with their stack and answered 500 without it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from metaproxy.errors import MetaproxyError, UnsupportedMediaType
from metaproxy.logs import printable, request_id_var

log = logging.getLogger("metaproxy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = "X-Request-Id"


def new_request_id() -> str:
    return secrets.token_hex(8)


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    retry_after: float | None = None,
    *,
    reason: str | None = None,
) -> web.Response:
    fields = {"code": code, "message": message, "request_id": request_id}
    if reason is not None:
        fields["reason"] = reason
    body = json.dumps(fields)
    headers = {REQUEST_ID: request_id}
    if retry_after is not None:
        # Whole seconds (RFC 9110), rounded down: callers add up to a second of jitter, which
        # lands them inside the second the broker picked for them.
        headers["Retry-After"] = str(max(1, int(retry_after)))
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()
    request_id_var.set(request_id)
    try:
        response = await handler(request)
    except MetaproxyError as exc:
        level = logging.WARNING if exc.status < 500 else logging.ERROR
        if exc.quiet:
            level = logging.DEBUG
        log.log(
            level,
            "%s %s -> %d %s: %s",
            printable(request.method),
            printable(request.path),  # decoded: `%0a` is a newline here
            exc.status,
            exc.code,
            printable(exc.detail),
        )
        return error_response(
            exc.status, exc.code, exc.public_message, request_id, exc.retry_after, reason=exc.reason
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.replace(" ", ""), exc.reason, request_id)
    except Exception:
        log.exception(
            "unhandled error on %s %s", printable(request.method), printable(request.path)
        )
        return error_response(500, "InternalError", "internal error", request_id)
    response.headers.setdefault(REQUEST_ID, request_id)
    return response


@web.middleware
async def identity_encoding_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a body with any `Content-Encoding` but identity.

    Nothing we serve takes a compressed body, and decoding one is work (and a decompression
    bomb) on a client's behalf; a gzip body that did not decode was a 500 with a traceback.
    The servers also run with `auto_decompress=False`, so the body is never decoded on the way
    to this check or while aiohttp drains what a handler left unread."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:32]!r} refused",
            public_message="Content-Encoding is not accepted",
        )
    return await handler(request)
