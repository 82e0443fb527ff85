"""The aiohttp side of the connection guard (`metaproxy.net.connguard`): guarded sites, a body
deadline middleware, the per-connection limits, quiet parser-error logging and the `Expect`
check. Imported by the broker
and the webhook, never by the sidecar (which serves with `metaproxy.sidecar.wire.http1`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from metaproxy.net.connguard import ConnectionGuard, RejectResponse
from metaproxy.net.listener import GuardedListener

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger with the client's mistakes demoted.

    aiohttp logs every request its parser refuses (bad request line, header too long, NUL
    bytes, …) with a full traceback at ERROR: any client could fill the log with them and bury
    real failures. A parser refusal is a 4xx the client caused, logged at DEBUG without the
    stack; a handler that really failed (500) still logs at ERROR.
    """

    # aiohttp passes the exception itself as exc_info.
    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: Any) -> None:
        # A body that does not decode surfaces while aiohttp drains it, as a RequestPayloadError
        # caused by the parser's 400.
        cause = exc_info.__cause__ if isinstance(exc_info, RequestPayloadError) else exc_info
        if isinstance(cause, HttpProcessingError) and 400 <= cause.code < 500:
            self.debug(f"{msg}: %d %s", *args, cause.code, str(cause.message)[:200])
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


def protocol_logger() -> ProtocolLog:
    """For aiohttp's `logger` handler argument."""
    return ProtocolLog(logging.getLogger("aiohttp.server"), {})


def handler_arguments(
    *, header_timeout: float, keepalive_timeout: float, max_header_bytes: int, max_headers: int
) -> dict[str, Any]:
    """aiohttp's per-connection settings (`web.AppRunner(app, **these)`) for a server behind a
    guard: the longest request line and header, the most headers, how long an idle kept-alive
    connection stays, how long a closing one waits for the rest of a body, parser refusals
    logged quietly (`ProtocolLog`), and no body ever decoded (an encoded one is refused:
    `httperrors.identity_encoding_only`)."""
    return {
        "keepalive_timeout": keepalive_timeout,
        "max_line_size": max_header_bytes,
        "max_field_size": max_header_bytes,
        "max_headers": max_headers,
        "lingering_time": header_timeout,
        "logger": protocol_logger(),
        "auto_decompress": False,
    }


def body_deadline(seconds: float) -> Middleware:
    """A middleware that reads the whole request body within `seconds` before the handler runs
    (aiohttp's body reads wait forever): a client trickling its body gets 408, not a worker."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()  # cached: the handler's own read returns these bytes
            except TimeoutError:
                raise web.HTTPRequestTimeout() from None
            except ConnectionError:
                # The client went away (or its framing broke) mid-body: nobody to answer, and
                # nothing for the error log either.
                raise web.HTTPBadRequest(reason="Incomplete Body") from None
        return await handler(request)

    return middleware


def refuse_unknown_expectations(server: web.Server) -> None:
    """Answer 417 to any `Expect` but 100-continue before the application sees the request.

    aiohttp answers an unknown expectation itself, outside every middleware, with a text that
    quotes the header; a value that is not UTF-8 (`Expect: \\x80`) makes building that text
    raise, and the client gets a 500 (found by tests/test_fuzz_http.py). Every aiohttp server
    we run gets this: `runtime.start_site` applies it, and so does the webhook."""
    handler = server.request_handler

    async def checked(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.lower() != "100-continue":
            return web.Response(status=417, text="unsupported Expect header\n")
        return await handler(request)

    server.request_handler = checked


class GuardedTCPSite(web.TCPSite):
    """A TCPSite whose connections are counted by a ConnectionGuard from accept() on, TLS
    handshake included (`metaproxy.net.listener`)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        reject: RejectResponse,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard
        self._reject = reject

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; the listening part is ours
        server = self._runner.server
        assert server is not None
        listener = await GuardedListener.tcp(
            self._host,
            self._port,
            self._guard,
            server,
            self._reject,
            ssl_context=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._server = listener
        self._bound_port = listener.sockets[0].getsockname()[1]
        await listener.start_serving()


class GuardedUnixSite(web.UnixSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        path: str,
        *,
        guard: ConnectionGuard,
        reject: RejectResponse,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, path, **kwargs)
        self._guard = guard
        self._reject = reject

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        listener = GuardedListener.unix(
            str(self._path),
            self._guard,
            server,
            self._reject,
            ssl_context=self._ssl_context,
            backlog=self._backlog,
        )
        self._server = listener
        await listener.start_serving()
