"""A running sidecar: runners and bound URLs. Used by the CLI, the demo, netns attach and tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from metaproxy.clock import Clock
from metaproxy.config import SidecarConfig
from metaproxy.connguard import ConnectionGuard
from metaproxy.runtime import start_site
from metaproxy.sidecar.app import (
    build_admin_app,
    build_container_app,
    build_imds_app,
    build_state,
)
from metaproxy.sidecar.instrument import count_connections_with
from metaproxy.sidecar.limits import (
    admin_reject,
    build_guards,
    container_reject,
    handler_args,
    imds_reject,
    tarpit,
)
from metaproxy.sidecar.state import SidecarState

log = logging.getLogger("metaproxy.sidecar")


@dataclass
class SidecarServer:
    state: SidecarState
    imds_urls: list[str]
    container_urls: list[str]
    admin_url: str
    _runners: list[web.AppRunner]
    guard: ConnectionGuard  # IMDS + container: capped, counted, header deadline
    admin_guard: ConnectionGuard

    @property
    def imds_url(self) -> str:
        return self.imds_urls[0]

    @property
    def container_url(self) -> str:
        return self.container_urls[0]

    @classmethod
    async def start(cls, config: SidecarConfig, clock: Clock | None = None) -> SidecarServer:
        state = build_state(config, clock)
        guard, admin_guard = build_guards(state)
        count_connections_with(state.keeper, lambda: guard.open + admin_guard.open)
        limits = handler_args(config)
        imds_app, container_app = build_imds_app(state), build_container_app(state)
        for app in (imds_app, container_app):
            app.middlewares.insert(0, tarpit)
        # The admin runner owns the credential keeper: it starts first and stops last.
        admin = web.AppRunner(build_admin_app(state), access_log=None, **limits)
        imds_runner = web.AppRunner(
            imds_app,
            access_log=None,
            shutdown_timeout=config.drain_seconds,
            **limits,
        )
        container_runner = web.AppRunner(
            container_app,
            access_log=None,
            shutdown_timeout=config.drain_seconds,
            **limits,
        )
        for runner in (admin, imds_runner, container_runner):
            await runner.setup()
        _, admin_url = await start_site(
            admin, config.admin_listen, guard=admin_guard, reject=admin_reject
        )
        imds_urls = [
            (await start_site(imds_runner, a, guard=guard, reject=imds_reject))[1]
            for a in config.imds_listen
        ]
        container_urls = [
            (await start_site(container_runner, a, guard=guard, reject=container_reject))[1]
            for a in config.container_listen
        ]
        log.info(
            "sidecar serving IMDS on %s, container credentials on %s",
            ", ".join(imds_urls),
            ", ".join(container_urls),
        )
        return cls(
            state,
            imds_urls,
            container_urls,
            admin_url,
            [admin, imds_runner, container_runner],
            guard,
            admin_guard,
        )

    async def stop(self) -> None:
        """Drain: /readyz turns false, in-flight requests finish (capped), then close."""
        self.state.draining = True
        admin, *serving = self._runners
        for runner in serving:
            await runner.cleanup()
        await admin.cleanup()
