"""A running broker: its runners, bound URLs and services. Used by the CLI, the demo and tests."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from metaproxy.broker.app import (
    BrokerServices,
    build_admin_app,
    build_app,
    create_services,
    probe,
)
from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.tls import CertificateReloader
from metaproxy.net.connguard import (
    ConnectionGuard,
    ConnectionLimits,
    ProbeAnswer,
    canned_response,
)
from metaproxy.net.webguard import body_deadline, protocol_logger
from metaproxy.process.runtime import server_tls_context, start_site

if TYPE_CHECKING:
    from metaproxy.broker.control import ControlToken

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
ADMIN_LIMITS = ConnectionLimits(max_connections=64, max_per_client=32)
_REJECT = canned_response(
    429,
    "Too Many Requests",
    b'{"code": "TooManyConnections", "message": "too many connections", "request_id": ""}',
    "application/json",
)


def _reject() -> bytes:
    return _REJECT


def _probe_answers(services: BrokerServices) -> ProbeAnswer:
    """/healthz and /readyz for connections past the admin cap, as the admin app answers them."""

    def answer(target: bytes) -> bytes | None:
        found = probe(services, target.decode("latin-1"))
        if found is None:
            return None
        status, text = found
        reason = "OK" if status == 200 else "Service Unavailable"
        return canned_response(status, reason, text.encode(), "text/plain; charset=utf-8")

    return answer


def build_guards(config: BrokerConfig) -> tuple[ConnectionGuard, ConnectionGuard]:
    per_client = config.max_connections
    if config.socket is None:
        per_client = max(1, config.max_connections // CLIENT_SHARE)
    public = ConnectionLimits(config.max_connections, per_client)
    admin = ConnectionGuard(
        "broker-admin", lambda: ADMIN_LIMITS, header_timeout=config.header_timeout
    )
    guard = ConnectionGuard(
        "broker",
        lambda: public,
        header_timeout=config.header_timeout,
        fd_reserve=admin.fd_reserve + ADMIN_LIMITS.max_connections,
    )
    return guard, admin


@dataclass
class BrokerServer:
    services: BrokerServices
    url: str
    admin_url: str
    control_url: str
    _runner: web.AppRunner
    _admin: web.AppRunner
    _control: web.AppRunner | None
    guard: ConnectionGuard
    admin_guard: ConnectionGuard
    certificate: CertificateReloader | None = None  # reloads a rotated cert/key pair

    @classmethod
    async def start(cls, config: BrokerConfig, **deps: Any) -> BrokerServer:
        # First: a half-configured TLS or a bad pair refuses to start.
        tls = server_tls_context(config.tls_cert, config.tls_key)
        certificate = (
            CertificateReloader(tls, config.tls_cert, config.tls_key)
            if tls is not None and config.tls_cert is not None and config.tls_key is not None
            else None
        )
        control_token = _control_token(config, tls)  # before anything starts, as TLS above
        services = create_services(config, **deps)
        guard, admin_guard = build_guards(config)
        admin_guard.probes = _probe_answers(services)
        services.scrape.open_connections = lambda: guard.open + admin_guard.open
        services.scrape.open_connections = lambda: guard.open
        handler_args: dict[str, Any] = {
            "keepalive_timeout": KEEPALIVE_SECONDS,
            "max_line_size": MAX_HEADER_BYTES,
            "max_field_size": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "lingering_time": config.header_timeout,
            "logger": protocol_logger(),
            # Never decode a body: an encoded one is refused (identity_encoding_only).
            "auto_decompress": False,
        }
        app = build_app(services)
        app.middlewares.append(body_deadline(config.header_timeout))
        runner = web.AppRunner(
            app,
            shutdown_timeout=config.drain_seconds,
            access_log=None,
            **handler_args,
        )
        admin_app = build_admin_app(services)
        admin_app.middlewares.append(body_deadline(config.header_timeout))
        admin = web.AppRunner(admin_app, access_log=None, **handler_args)
        await runner.setup()
        try:
            await admin.setup()
            address = f"unix:{config.socket}" if config.socket else config.listen
            _, url = await start_site(
                runner,
                address,
                ssl_context=tls,
                backlog=LISTEN_BACKLOG,
                guard=guard,
                reject=_reject,
            )
            _, admin_url = await start_site(
                admin, config.admin_listen, guard=admin_guard, reject=_reject
            )
            control, control_url = await _start_control(
                config,
                services,
                control_token,
                handler_args=handler_args,
                guard=admin_guard,
                tls=tls,
            )
        except BaseException:
            # A busy port, say: close what started (store, audit log) in order, not by the GC.
            await runner.cleanup()
            await admin.cleanup()
            raise
        log.info("broker listening on %s (admin %s, control %s)", url, admin_url, control_url)
        if certificate is not None:
            await certificate.start()
        return cls(
            services,
            url,
            admin_url,
            control_url,
            runner,
            admin,
            control,
            guard,
            admin_guard,
            certificate,
        )

    async def stop(self) -> None:
        """Drain: /readyz turns false, in-flight requests finish (capped), then close."""
        self.services.draining = True
        if self.certificate is not None:
            await self.certificate.aclose()
        if self._control is not None:
            await self._control.cleanup()
        await self._runner.cleanup()
        await self._admin.cleanup()


def _control_token(config: BrokerConfig, tls: ssl.SSLContext | None) -> ControlToken | None:
    """The control API's token, checked with the rest of the configuration before any start."""
    if not config.control_listen:
        return None
    from metaproxy.broker.control import ControlToken
    from metaproxy.errors import ConfigError

    if config.control_token_file is None:
        raise ConfigError("control_token_file: required with --control-listen")
    host = config.control_listen.rpartition(":")[0].strip("[]")
    if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
        # A bearer token in the clear on a network is a token for whoever listens.
        raise ConfigError("control_listen: off loopback the control API needs --tls-cert/--tls-key")
    return ControlToken(config.control_token_file)


async def _start_control(
    config: BrokerConfig,
    services: BrokerServices,
    token: ControlToken | None,
    *,
    handler_args: dict[str, Any],
    guard: ConnectionGuard,
    tls: ssl.SSLContext | None,
) -> tuple[web.AppRunner | None, str]:
    """The control API on its own listener, or none when `--control-listen` is empty."""
    if token is None:
        return None, ""
    from metaproxy.broker.control import build_control_app

    runner = web.AppRunner(build_control_app(services, token), access_log=None, **handler_args)
    await runner.setup()
    try:
        # Shares the admin listener's guard: both are for operators, a handful of connections.
        _, url = await start_site(
            runner, config.control_listen, ssl_context=tls, guard=guard, reject=_reject
        )
    except BaseException:
        await runner.cleanup()
        raise
    return runner, url
