"""A running webhook: the composition root of `metaproxy webhook`, run by
`metaproxy.process.serve`.

Its parts, in start order; they close in the reverse:
1. the TLS context (cert-manager's pair; SIGHUP loads a rotated one into the same context, and
   the next handshake uses it);
2. the application runner: the handlers (`app`), every body read within the header deadline,
   aiohttp's limits on request heads, the keep-alive reaper;
3. the listener, behind a connection guard as the broker's listeners are: connections are
   counted from accept() on, TLS handshakes included, capped in total and per client address
   (`--max-connections`), and the handshake and every request head and body have the header
   deadline.

Why the guard: with `failurePolicy: Fail` no labelled pod can be created while the webhook does
not answer, and 18,000 idle half-requests once took an unguarded webhook past its 128 MiB
memory limit. Past the cap, a client holding few connections (the API server) takes the oldest
connection of the one holding most, and the kubelet's `/healthz` is answered from the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Mapping
from types import TracebackType

from aiohttp import web

from metaproxy.net.connguard import ConnectionGuard, ConnectionLimits, canned_response
from metaproxy.net.webguard import body_deadline, handler_arguments
from metaproxy.process.runtime import server_tls_context, start_site
from metaproxy.webhook.app import build_app, settings_from_config
from metaproxy.webhook.config import WebhookConfig

log = logging.getLogger("metaproxy.webhook")

# The API server is one address or a few; one address holding more than this share of the
# connections is not one of them (behind a load balancer the operator raises the cap).
CLIENT_SHARE = 4
# The API server keeps its connection to a webhook between reviews; reap it if it idles longer.
KEEPALIVE_SECONDS = 60.0
# A review's head is small: the API server sends a handful of headers.
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 64
# Pods are created in bursts; connections past a full accept queue wait for TCP's retransmit.
LISTEN_BACKLOG = 1024
# What in-flight reviews get when the webhook closes without a drain (or after one was cut).
CLOSE_GRACE_SECONDS = 0.5
_REJECT = canned_response(
    429,
    "Too Many Requests",
    b'{"code": "TooManyConnections", "message": "too many connections", "request_id": ""}',
    "application/json",
)
_HEALTHY = canned_response(
    200, "OK", json.dumps({"status": "ok"}).encode(), "application/json; charset=utf-8"
)


def _reject() -> bytes:
    return _REJECT


def _probe(target: bytes) -> bytes | None:
    """The kubelet's probe past the cap: a webhook busy refusing a flood is still alive."""
    return _HEALTHY if target == b"/healthz" else None


def build_guard(config: WebhookConfig) -> ConnectionGuard:
    limits = ConnectionLimits(
        config.max_connections, max(1, config.max_connections // CLIENT_SHARE)
    )
    return ConnectionGuard(
        "webhook", lambda: limits, header_timeout=config.header_timeout, probes=_probe
    )


class Webhook:
    """`async with Webhook(config) as webhook:` serves reviews until the block ends."""

    guard: ConnectionGuard  # made by start()

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self._parts = contextlib.AsyncExitStack()
        self._tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self.url = ""

    def ready(self) -> Mapping[str, object]:
        return {"url": self.url}

    async def start(self) -> None:
        try:
            await self._start(self._parts)
        except BaseException:
            await self._parts.aclose()
            raise

    async def _start(self, parts: contextlib.AsyncExitStack) -> None:
        config = self.config
        settings = settings_from_config(config)
        self._tls = server_tls_context(config.tls_cert, config.tls_key)

        app = build_app(settings)
        app.middlewares.append(body_deadline(config.header_timeout))
        limits = handler_arguments(
            header_timeout=config.header_timeout,
            keepalive_timeout=KEEPALIVE_SECONDS,
            max_header_bytes=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_GRACE_SECONDS, **limits)
        await runner.setup()
        parts.push_async_callback(runner.cleanup)
        self._runner = runner

        self.guard = build_guard(config)
        self._site, self.url = await start_site(
            runner,
            config.listen,
            ssl_context=self._tls,
            backlog=LISTEN_BACKLOG,
            guard=self.guard,
            reject=_reject,
        )
        log.info("webhook serving on %s (image %s)", self.url, settings.image)

    def reload(self) -> None:
        """SIGHUP: cert-manager rotated the certificate; new connections get the new one."""
        cert, key = self.config.tls_cert, self.config.tls_key
        if self._tls is None or cert is None or key is None:
            return
        try:
            self._tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError):
            log.exception("certificate reload failed; keeping the current one")
        else:
            log.info("certificate reloaded")

    async def drain(self, deadline: float) -> None:
        """SIGTERM: stop accepting (the API server retries on another replica), close idle
        connections, and let in-flight reviews finish by `deadline` (loop time)."""
        log.info("webhook stopping")
        if self._site is not None:
            await self._site.stop()
        server = self._runner.server if self._runner is not None else None
        if server is not None:
            server.pre_shutdown()
            await server.shutdown(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def aclose(self) -> None:
        await self._parts.aclose()

    async def __aenter__(self) -> Webhook:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
