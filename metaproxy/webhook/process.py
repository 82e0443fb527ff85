"""A running webhook: the composition root of `metaproxy webhook`, run by
`metaproxy.process.serve`.

Its parts, in start order; they close in the reverse:
1. the TLS context (cert-manager's pair; SIGHUP loads a rotated one into the same context, and
   the next handshake uses it);
2. the application runner: the handlers (`app`);
3. the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from types import TracebackType

from aiohttp import web

from metaproxy.process.runtime import server_tls_context, start_site
from metaproxy.webhook.app import build_app, settings_from_config
from metaproxy.webhook.config import WebhookConfig

log = logging.getLogger("metaproxy.webhook")

# What in-flight reviews get when the webhook closes without a drain (or after one was cut).
CLOSE_GRACE_SECONDS = 0.5


class Webhook:
    """`async with Webhook(config) as webhook:` serves reviews until the block ends."""

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
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_GRACE_SECONDS)
        await runner.setup()
        parts.push_async_callback(runner.cleanup)
        self._runner = runner

        self._site, self.url = await start_site(runner, config.listen, ssl_context=self._tls)
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
