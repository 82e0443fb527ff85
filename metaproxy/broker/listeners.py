"""The broker's three listeners, each behind a connection guard: public, admin and control.

Every connection is counted and capped from accept() on, before any TLS handshake; a client
over its share gets a canned 429 and the connection is closed. Past the admin port's cap, a
health probe is still answered (from the guard, by the same `Probe`): probes are never refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass

from aiohttp import web

from metaproxy.broker.admin import Probe
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.config_values import socket_permissions
from metaproxy.net.connguard import (
    ConnectionGuard,
    ConnectionLimits,
    ProbeAnswer,
    canned_response,
)
from metaproxy.net.webguard import protocol_logger
from metaproxy.process.runtime import start_site

log = logging.getLogger("metaproxy.broker")

# Sidecars hold one pooled keep-alive connection or a few; one address holding a quarter of the
# broker's connections is a leak or an attack. (Behind a Unix socket every peer is one address.)
CLIENT_SHARE = 4
# Sidecars keep their connection to the broker between refreshes; reap it if it idles longer.
KEEPALIVE_SECONDS = 60.0
# A deployment starts thousands of sidecars at once. Connections past a full accept queue are
# dropped at the handshake and come back only on TCP's retransmit timer (1, 2, 4 … 32 s), so the
# queue is as deep as the kernel allows (net.core.somaxconn caps it, 4096 by default).
LISTEN_BACKLOG = 4096
# Kubernetes service-account tokens in `Authorization` run to a few KB; 8 KB per line is plenty.
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 64
# What in-flight requests get when a listener closes after the drain (or after one was cut).
CLOSE_GRACE_SECONDS = 0.5
ADMIN_LIMITS = ConnectionLimits(max_connections=64, max_per_client=32)
# The control API is its own listener with its own cap: scrapers holding every admin connection
# must not keep an operator from revoking a task. A handful of operators, a CLI each.
CONTROL_LIMITS = ConnectionLimits(max_connections=16, max_per_client=8)
_REJECT = canned_response(
    429,
    "Too Many Requests",
    b'{"code": "TooManyConnections", "message": "too many connections", "request_id": ""}',
    "application/json",
)


def _reject() -> bytes:
    return _REJECT


def probe_answers(probe: Probe) -> ProbeAnswer:
    """/healthz and /readyz for connections past the admin cap, as the admin app answers them."""

    def answer(target: bytes) -> bytes | None:
        found = probe.answer(target.decode("latin-1"))
        if found is None:
            return None
        status, text = found
        reason = "OK" if status == 200 else "Service Unavailable"
        return canned_response(status, reason, text.encode(), "text/plain; charset=utf-8")

    return answer


@dataclass(frozen=True, slots=True)
class Guards:
    public: ConnectionGuard
    admin: ConnectionGuard
    control: ConnectionGuard


def build_guards(config: BrokerConfig, probe: Probe) -> Guards:
    per_client = config.max_connections
    if config.socket is None:
        per_client = max(1, config.max_connections // CLIENT_SHARE)
    public = ConnectionLimits(config.max_connections, per_client)
    admin = ConnectionGuard(
        "broker-admin",
        lambda: ADMIN_LIMITS,
        header_timeout=config.header_timeout,
        probes=probe_answers(probe),
    )
    control = ConnectionGuard(
        "broker-control",
        lambda: CONTROL_LIMITS,
        header_timeout=config.header_timeout,
        fd_reserve=admin.fd_reserve + ADMIN_LIMITS.max_connections,
    )
    guard = ConnectionGuard(
        "broker",
        lambda: public,
        header_timeout=config.header_timeout,
        fd_reserve=control.fd_reserve + CONTROL_LIMITS.max_connections,
    )
    return Guards(guard, admin, control)


@dataclass(frozen=True, slots=True)
class Apps:
    public: web.Application
    admin: web.Application
    control: web.Application | None  # None: no --control-listen


class Listeners:
    """The three listeners, started together; `drain` stops the public one taking work and
    waits for what it holds, and closing closes the public one first."""

    def __init__(
        self, config: BrokerConfig, apps: Apps, probe: Probe, tls: ssl.SSLContext | None
    ) -> None:
        self._config = config
        self._apps = apps
        self._tls = tls
        guards = build_guards(config, probe)
        self.guard, self.admin_guard, self.control_guard = (
            guards.public,
            guards.admin,
            guards.control,
        )
        self._runners: list[web.AppRunner] = []
        self._public: web.AppRunner | None = None
        self.url = self.admin_url = self.control_url = ""

    @property
    def open_connections(self) -> int:
        return self.guard.open

    def _runner(self, app: web.Application) -> web.AppRunner:
        return web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=KEEPALIVE_SECONDS,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=self._config.header_timeout,
            shutdown_timeout=CLOSE_GRACE_SECONDS,
            logger=protocol_logger(),
            # Never decode a body: an encoded one is refused (identity_encoding_only).
            auto_decompress=False,
        )

    async def start(self) -> None:
        config, apps = self._config, self._apps
        try:
            public = self._public = self._runner(apps.public)
            await self._setup(public)
            address = f"unix:{config.socket}" if config.socket else config.listen
            _, self.url = await start_site(
                public,
                address,
                ssl_context=self._tls,
                backlog=LISTEN_BACKLOG,
                guard=self.guard,
                reject=_reject,
            )
            if config.socket is not None:
                mode, gid = socket_permissions(config.socket_mode, config.socket_group)
                # connect() needs write permission, which the umask (root's 022, say) leaves
                # to the owner alone: a non-root sidecar (the image's uid 10001) was refused.
                if gid is not None:
                    os.chown(config.socket, -1, gid)
                os.chmod(config.socket, mode)
            admin = self._runner(apps.admin)
            await self._setup(admin)
            _, self.admin_url = await start_site(
                admin, config.admin_listen, guard=self.admin_guard, reject=_reject
            )
            if apps.control is not None:
                control = self._runner(apps.control)
                await self._setup(control)
                _, self.control_url = await start_site(
                    control,
                    config.control_listen,
                    ssl_context=self._tls,
                    guard=self.control_guard,
                    reject=_reject,
                )
        except BaseException:
            await self.aclose()  # a busy port, say: what started stops, in order
            raise
        log.info(
            "broker listening on %s (admin %s, control %s)",
            self.url,
            self.admin_url,
            self.control_url or "off",
        )

    async def _setup(self, runner: web.AppRunner) -> None:
        await runner.setup()
        self._runners.append(runner)

    async def drain(self, deadline: float) -> None:
        """The public port stops accepting, its idle connections close, and the requests in
        flight finish by `deadline` (loop time); admin and control keep serving."""
        server = self._public.server if self._public is not None else None
        if self._public is None or server is None:
            return
        for site in list(self._public.sites):
            await site.stop()
        server.pre_shutdown()
        await server.shutdown(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def aclose(self) -> None:
        """The public port first, then admin and control; what a drain left in flight gets
        `CLOSE_GRACE_SECONDS`."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self._public = None
