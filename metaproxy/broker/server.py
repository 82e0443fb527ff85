"""A running broker: its runners, bound URLs and services. Used by the CLI, the demo and tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from metaproxy.broker.app import (
    BrokerServices,
    build_admin_app,
    build_app,
    create_services,
    server_tls_context,
)
from metaproxy.config import BrokerConfig
from metaproxy.runtime import start_site

log = logging.getLogger("metaproxy.broker")


@dataclass
class BrokerServer:
    services: BrokerServices
    url: str
    admin_url: str
    _runner: web.AppRunner
    _admin: web.AppRunner

    @classmethod
    async def start(cls, config: BrokerConfig, **deps: Any) -> BrokerServer:
        services = create_services(config, **deps)
        runner = web.AppRunner(
            build_app(services), shutdown_timeout=config.drain_seconds, access_log=None
        )
        admin = web.AppRunner(build_admin_app(services), access_log=None)
        await runner.setup()
        await admin.setup()
        address = f"unix:{config.socket}" if config.socket else config.listen
        _, url = await start_site(runner, address, ssl_context=server_tls_context(config))
        _, admin_url = await start_site(admin, config.admin_listen)
        log.info("broker listening on %s (admin %s)", url, admin_url)
        return cls(services, url, admin_url, runner, admin)

    async def stop(self) -> None:
        """Drain: /readyz turns false, in-flight requests finish (capped), then close."""
        self.services.draining = True
        await self._runner.cleanup()
        await self._admin.cleanup()
