"""A running sidecar: its parts, started in order and closed in reverse. Used by the CLI, the
demo, netns attach and tests.

Every listener is `http1` behind a `ConnectionGuard`: the guard admits or refuses each
connection (caps, eviction of the idlest, descriptor budget, first-request deadline), the
protocol parses and answers. IMDS and container credentials share one guard; admin has its own,
smaller one, so a task flooding IMDS cannot fail the kubelet's probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from metaproxy.clock import Clock
from metaproxy.config import split_host_port
from metaproxy.net.connguard import ACCEPT_BACKLOG, ConnectionGuard
from metaproxy.sidecar import container_creds, imds, instrument
from metaproxy.sidecar.app import admin_error_page, admin_plane, build_state, data_plane
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.face import Face
from metaproxy.sidecar.guards import admin_reject, build_guards
from metaproxy.sidecar.state import SidecarState
from metaproxy.sidecar.wire import http1

log = logging.getLogger("metaproxy.sidecar")

# After SIGTERM the sidecar serves on until its clients have been silent this long: long enough
# for a client's next poll after a request (SDKs fetch token, role and credentials back to back),
# short enough that a pod whose application has already gone is not held up.
QUIET_SECONDS = 1.0


async def listen(address: str, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a sidecar that did not stop cleanly
        return await loop.create_unix_server(factory, path, backlog=ACCEPT_BACKLOG)
    host, port = split_host_port(address)
    sock = _listening_socket(host, port)
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=ACCEPT_BACKLOG)
    return await loop.create_server(factory, host, port, backlog=ACCEPT_BACKLOG, reuse_address=True)


def _listening_socket(host: str, port: int) -> socket.socket | None:
    """A bound socket for an IP literal (None for a name). `create_server` resolves even a
    literal with getaddrinfo, which passes it through the `idna` codec: a third of a megabyte
    (`unicodedata`, `stringprep`) in every pod for `169.254.169.254` (issue 13)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as create_server does
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # asyncio's words, which `servercmd.describe_listen_error` reads the address from.
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(
            exc.errno, f"error while attempting to bind on address {(host, port)!r}: {reason}"
        ) from None
    sock.setblocking(False)
    return sock


def _without_ipv6(address: str, exc: OSError) -> bool:
    """A bind to an IPv6 address failed because the namespace has no IPv6 at all."""
    return address.startswith("[") and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


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
    admin_tracker: http1.ConnectionTracker
    _servers: list[asyncio.Server] = field(default_factory=list)
    _admin: asyncio.Server | None = None

    @property
    def imds_url(self) -> str:
        return self.imds_urls[0]

    @property
    def container_url(self) -> str:
        return self.container_urls[0]

    @classmethod
    async def start(
        cls,
        config: SidecarConfig,
        clock: Clock | None = None,
        *,
        on_started: Callable[[], None] | None = None,
    ) -> SidecarServer:
        """Listening, with the credential keeper started; `on_started` is called once, when the
        first credentials are in."""
        state = build_state(config, clock, on_started)
        guard, admin_guard = build_guards(state)
        state.guards = (guard, admin_guard)
        count_rejection = instrument.rejection_counter(state.metrics)
        limits = http1.ServerLimits(
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            max_body_bytes=config.max_body_bytes,
        )
        tracker = http1.ConnectionTracker(limits, on_reject=count_rejection)
        admin_tracker = http1.ConnectionTracker(
            http1.ServerLimits(
                header_timeout=config.header_timeout,
                keepalive_timeout=config.keepalive_timeout,
                max_body_bytes=config.max_body_bytes,
            ),
            on_reject=count_rejection,
        )
        tracker.start()
        admin_tracker.start()
        state.keeper.start()
        admin_protocol = http1.protocol_factory(
            admin_plane(state), admin_tracker, admin_error_page, server="metaproxy"
        )
        admin = await listen(
            config.admin_listen, admin_guard.protocol_factory(admin_protocol, admin_reject)
        )
        servers: list[asyncio.Server] = []
        urls: dict[str, list[str]] = {"imds": [], "container": []}
        faces: list[tuple[Face, str]] = [(imds.FACE, a) for a in config.imds_listen]
        faces += [(container_creds.FACE, a) for a in config.container_listen]
        for face, address in faces:
            protocol = http1.protocol_factory(
                data_plane(state, face, address), tracker, face.error_page, face.server
            )
            factory = guard.protocol_factory(protocol, face.refuse_connection)
            try:
                server = await listen(address, factory)
            except OSError as exc:
                face_addresses = [a for f, a in faces if f is face]
                if not _without_ipv6(address, exc) or all(
                    a.startswith("[") for a in face_addresses
                ):
                    raise
                # The webhook asks for [::1] beside 127.0.0.1 without knowing the pod's
                # network: a namespace without IPv6 simply has no IPv6 clients.
                log.warning("not serving %s: this network namespace has no IPv6", address)
                continue
            servers.append(server)
            urls[face.name].append(server_url(server))
        log.info(
            "sidecar serving IMDS on %s, container credentials on %s",
            ", ".join(urls["imds"]),
            ", ".join(urls["container"]),
        )
        if state.link_local is not None:
            state.link_local.start()  # once the IMDS listener it checks for is up
        return cls(
            state, urls["imds"], urls["container"], server_url(admin), guard, admin_guard,
            tracker, admin_tracker, servers, admin,
        )  # fmt: skip

    async def stop(self) -> None:
        """SIGTERM. The task is stopping: /readyz turns false and IMDS announces the task's end
        as EC2 announces an instance's (`spot/instance-action`), while the listeners keep serving
        — credentials included — until the task's clients go quiet (in Kubernetes a native
        sidecar is stopped only after the application has exited) or `drain_seconds` run out.
        Then the listeners close, idle connections close, in-flight requests finish, and the
        keeper, the broker client and the admin listener stop, in the reverse of their start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.config.drain_seconds
        self.state.draining = True
        self.state.begin_termination()
        # The last part of the drain is for requests already in flight.
        await self.tracker.quiet(
            QUIET_SECONDS, deadline - min(1.0, self.state.config.drain_seconds / 2)
        )
        for server in self._servers:
            server.close()
        await self.tracker.drain(max(0.0, deadline - loop.time()))
        await self.tracker.stop()
        if self.state.link_local is not None:
            await self.state.link_local.aclose()
        await self.state.keeper.aclose()
        await self.state.client.aclose()
        if self.state.host_metadata is not None:
            await self.state.host_metadata.aclose()
        if self._admin is not None:
            self._admin.close()
        await self.admin_tracker.drain(0.5)
        await self.admin_tracker.stop()
