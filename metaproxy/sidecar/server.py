"""A running sidecar: listeners and bound URLs. Used by the CLI, the demo, netns attach and tests.

The data plane (IMDS, container credentials) is `http1` behind a `ConnectionGuard`: the guard
admits or refuses each connection (caps, eviction, descriptor budget, first-request deadline),
the protocol parses and answers. Admin is an aiohttp app behind its own, smaller guard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from metaproxy.clock import Clock
from metaproxy.config import SidecarConfig, split_host_port
from metaproxy.connguard import ACCEPT_BACKLOG, ConnectionGuard
from metaproxy.runtime import start_site
from metaproxy.sidecar import http1, instrument
from metaproxy.sidecar.app import Face, build_admin_app, build_state, data_plane, error_page
from metaproxy.sidecar.limits import (
    admin_reject,
    build_guards,
    container_reject,
    handler_args,
    imds_reject,
)
from metaproxy.sidecar.state import SidecarState

log = logging.getLogger("metaproxy.sidecar")


async def listen(address: str, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if address.startswith("unix:"):
        return await loop.create_unix_server(
            factory, address.removeprefix("unix:"), backlog=ACCEPT_BACKLOG
        )
    host, port = split_host_port(address)
    return await loop.create_server(factory, host, port, backlog=ACCEPT_BACKLOG, reuse_address=True)


def server_url(server: asyncio.Server) -> str:
    name = server.sockets[0].getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class SidecarServer:
    state: SidecarState
    imds_urls: list[str]
    container_urls: list[str]
    admin_url: str
    guard: ConnectionGuard  # IMDS + container: capped, counted, header deadline
    admin_guard: ConnectionGuard
    tracker: http1.ConnectionTracker
    _admin: web.AppRunner
    _servers: list[asyncio.Server] = field(default_factory=list)

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
        instrument.count_connections_with(state.keeper, guard, admin_guard)
        tracker = http1.ConnectionTracker(
            http1.ServerLimits(
                header_timeout=config.header_timeout,
                keepalive_timeout=config.keepalive_timeout,
                max_header_bytes=config.max_header_bytes,
                max_headers=config.max_headers,
                max_body_bytes=config.max_body_bytes,
            ),
            on_reject=instrument.count_rejection,
        )
        tracker.start()
        # The admin runner owns the credential keeper: it starts first and stops last.
        admin = web.AppRunner(build_admin_app(state), access_log=None, **handler_args(config))
        await admin.setup()
        _, admin_url = await start_site(
            admin, config.admin_listen, guard=admin_guard, reject=admin_reject
        )
        servers: list[asyncio.Server] = []
        urls: dict[Face, list[str]] = {"imds": [], "container": []}
        faces: list[tuple[Face, str]] = [("imds", a) for a in config.imds_listen]
        faces += [("container", a) for a in config.container_listen]
        for face, address in faces:
            protocol = http1.protocol_factory(data_plane(state, face), tracker, error_page(face))
            reject = imds_reject if face == "imds" else container_reject
            server = await listen(address, guard.protocol_factory(protocol, reject))
            servers.append(server)
            urls[face].append(server_url(server))
        log.info(
            "sidecar serving IMDS on %s, container credentials on %s",
            ", ".join(urls["imds"]),
            ", ".join(urls["container"]),
        )
        return cls(
            state, urls["imds"], urls["container"], admin_url, guard, admin_guard, tracker,
            admin, servers,
        )  # fmt: skip

    async def stop(self) -> None:
        """Drain: /readyz turns false, listeners close, idle connections close, in-flight
        requests finish (at most `drain_seconds`), then the keeper and admin stop."""
        self.state.draining = True
        for server in self._servers:
            server.close()
        await self.tracker.drain(self.state.config.drain_seconds)
        await self.tracker.stop()
        await self._admin.cleanup()
