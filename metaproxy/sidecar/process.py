"""A running sidecar: the composition root of `metaproxy sidecar` (and of the demo's, netns
attach's and the tests' sidecars), run by `metaproxy.process.serve`.

Its parts, in start order; they close in the reverse:
1. the broker client, and the node's IMDS client when there is an allow-list: nothing to start,
   and closed last, after everything that uses them;
2. admin (health, readiness, metrics): its connection tracker and listener, up first and down
   last, so the kubelet's probes are answered for the sidecar's whole life;
3. the credential keeper, which fetches the first credentials and keeps them fresh;
4. the data plane: its connection tracker, then one listener per IMDS and container address;
5. the link-local check, once the IMDS listener it looks for is up.

Every listener is `http1` behind a `ConnectionGuard`: the guard admits or refuses each
connection (caps, eviction of the idlest, descriptor budget, first-request deadline), the
protocol parses and answers. IMDS and container credentials share one guard; admin has its own,
smaller one, so a task flooding IMDS cannot fail the kubelet's probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from metaproxy.clock import Clock, SystemClock
from metaproxy.net.connguard import ConnectionGuard
from metaproxy.process.serve import started
from metaproxy.sidecar import container_creds, imds, instrument
from metaproxy.sidecar.app import admin_error_page, admin_plane, data_plane
from metaproxy.sidecar.config import (
    SidecarConfig,
    authorization_token_mode,
    container_token_source,
)
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.face import Face
from metaproxy.sidecar.guards import admin_reject, build_guards
from metaproxy.sidecar.imds_view import render_view
from metaproxy.sidecar.lifecycle import TerminationNotice
from metaproxy.sidecar.metrics import SidecarMetrics
from metaproxy.sidecar.rebinding import HostCheck
from metaproxy.sidecar.state import PerGrant, SidecarState
from metaproxy.sidecar.tokens import TokenAuthority, load_or_create_key
from metaproxy.sidecar.wire import http1
from metaproxy.sidecar.wire.connections import ConnectionTracker
from metaproxy.sidecar.wire.listen import listen, server_url
from metaproxy.sidecar.wire.messages import ServerLimits, http_date

log = logging.getLogger("metaproxy.sidecar")

# After SIGTERM the sidecar serves on until its clients have been silent this long: long enough
# for a client's next poll after a request (SDKs fetch token, role and credentials back to back),
# short enough that a pod whose application has already gone is not held up.
QUIET_SECONDS = 1.0
# A scrape or probe in flight when the sidecar closes still gets its answer, within this.
ADMIN_GRACE_SECONDS = 0.5


class Sidecar:
    """`async with Sidecar(config) as sidecar:` serves until the block ends (see the module's
    docstring for the parts and their order); `drain` is SIGTERM's gentle part."""

    # Made by start().
    state: SidecarState
    guard: ConnectionGuard  # IMDS + container: capped, counted, header deadline
    admin_guard: ConnectionGuard
    tracker: ConnectionTracker
    admin_tracker: ConnectionTracker

    def __init__(
        self,
        config: SidecarConfig,
        clock: Clock | None = None,
        *,
        on_started: Callable[[], None] | None = None,
        after_burst: Callable[[], None] | None = None,
    ) -> None:
        """`on_started` is called once, when the first credentials are in; `after_burst` each
        time a burst of task connections has ended (`ConnectionTracker.after_burst`)."""
        self.config = config
        self._clock = clock or SystemClock()
        self._on_started = on_started
        self._after_burst = after_burst
        self._parts = contextlib.AsyncExitStack()
        self._listeners: list[asyncio.Server] = []  # the data plane's
        self.imds_urls: list[str] = []
        self.container_urls: list[str] = []
        self.admin_url = ""

    @property
    def imds_url(self) -> str:
        return self.imds_urls[0]

    @property
    def container_url(self) -> str:
        return self.container_urls[0]

    def ready(self) -> Mapping[str, object]:
        return {
            "imds_urls": self.imds_urls,
            "container_urls": self.container_urls,
            "admin_url": self.admin_url,
        }

    async def start(self) -> None:
        """Listening, with the credential keeper started."""
        try:
            await self._start(self._parts)
        except BaseException:
            await self._parts.aclose()
            raise

    async def _start(self, parts: contextlib.AsyncExitStack) -> None:
        config = self.config
        state = self.state = build_state(config, self._clock, self._on_started)
        parts.push_async_callback(state.client.aclose)
        if state.host_metadata is not None:
            parts.push_async_callback(state.host_metadata.aclose)
        self.guard, self.admin_guard = state.guards = build_guards(state)
        count_rejection = instrument.rejection_counter(state.metrics)

        admin_limits = ServerLimits(
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_body_bytes=config.max_body_bytes,
        )
        self.admin_tracker = await started(
            parts, ConnectionTracker(admin_limits, on_reject=count_rejection)
        )
        admin_protocol = http1.protocol_factory(
            admin_plane(state), self.admin_tracker, admin_error_page, server="metaproxy"
        )
        admin = await listen(
            config.admin_listen, self.admin_guard.protocol_factory(admin_protocol, admin_reject)
        )
        parts.push_async_callback(self.admin_tracker.drain, ADMIN_GRACE_SECONDS)
        parts.callback(admin.close)
        self.admin_url = server_url(admin)

        await started(parts, state.keeper)

        limits = ServerLimits(
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            max_body_bytes=config.max_body_bytes,
        )
        self.tracker = await started(
            parts,
            ConnectionTracker(limits, on_reject=count_rejection, after_burst=self._after_burst),
        )
        await self._listen_to_tasks(parts)
        log.info(
            "sidecar serving IMDS on %s, container credentials on %s",
            ", ".join(self.imds_urls),
            ", ".join(self.container_urls) or "none",
        )

        if state.link_local is not None:
            await started(parts, state.link_local)

    async def _listen_to_tasks(self, parts: contextlib.AsyncExitStack) -> None:
        """One listener per IMDS and container address, each with its face's handler."""
        config, state = self.config, self.state
        faces: list[tuple[Face, str]] = [(imds.FACE, a) for a in config.imds_listen]
        if container_token_source(config):
            faces += [(container_creds.FACE, a) for a in config.container_listen]
        elif config.container_listen:
            # The token it would check would be one nobody can read: every request refused.
            log.error(
                "not serving container credentials on %s: no token the app can read; give "
                "--authorization-token-file or --container-credentials-path "
                "(or --container-listen '' to silence this)",
                ", ".join(config.container_listen),
            )
        urls = {imds.FACE.name: self.imds_urls, container_creds.FACE.name: self.container_urls}
        for face, address in faces:
            plane = data_plane(state, face, address)
            protocol = http1.protocol_factory(
                plane.handle, self.tracker, face.error_page, face.server, plane.repeats
            )
            try:
                server = await listen(
                    address, self.guard.protocol_factory(protocol, face.refuse_connection)
                )
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
            parts.callback(server.close)
            self._listeners.append(server)
            urls[face.name].append(server_url(server))

    async def drain(self, deadline: float) -> None:
        """SIGTERM. The task is stopping: /readyz turns false and IMDS announces the task's end
        as EC2 announces an instance's (`spot/instance-action`), while the listeners keep serving
        — credentials included — until the task's clients go quiet (in Kubernetes a native
        sidecar is stopped only after the application has exited) or `deadline` (loop time)
        nears. Then the listeners close, idle connections close, and in-flight requests finish
        by `deadline`."""
        loop = asyncio.get_running_loop()
        self.state.draining = True
        self.state.begin_termination()
        # The last part of the drain is for requests already in flight.
        in_flight = min(1.0, (deadline - loop.time()) / 2)
        await self.tracker.quiet(QUIET_SECONDS, deadline - in_flight)
        for server in self._listeners:
            server.close()
        await self.tracker.drain(max(0.0, deadline - loop.time()))

    async def aclose(self) -> None:
        """Every part, in the reverse of its start."""
        await self._parts.aclose()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def build_state(
    config: SidecarConfig, clock: Clock, on_started: Callable[[], None] | None
) -> SidecarState:
    """What the sidecar's handlers share (`SidecarState`), its parts built but not started."""
    metrics = SidecarMetrics()
    client = instrument.TimedBrokerClient(config, metrics)
    keeper = CredentialKeeper(
        client, config, clock, on_grant=instrument.GrantObserver(clock, metrics, on_started)
    )
    notice = TerminationNotice()
    state = SidecarState(
        config=config,
        tokens=TokenAuthority(load_or_create_key(config.imds_token_key_file)),
        keeper=keeper,
        authorization_token=container_creds.load_or_create_token(
            config.authorization_token_file, authorization_token_mode(config)
        ),
        client=client,
        metrics=metrics,
        imds_view=PerGrant(functools.partial(render_view, notice=notice)),
        container_document=PerGrant(container_creds.render_document),
        hosts=HostCheck(config.allowed_hosts),
        clock=clock,
        notice=notice,
        started=http_date(time.time()),
        relative_path=config.container_credentials_path.encode(),
    )
    if config.host_metadata_allow:  # no allow-list: the host's IMDS is never even contacted
        from metaproxy.sidecar.host_metadata import HostMetadata

        state.host_metadata = HostMetadata(
            config.host_metadata_url,
            config.host_metadata_allow,
            interface=config.host_metadata_interface,
        )
        client.node_facts = state.host_metadata.facts
    if config.link_local_check:
        from metaproxy.sidecar.link_local import LinkLocalCheck

        state.link_local = LinkLocalCheck(state.tokens)
    return state


def _without_ipv6(address: str, exc: OSError) -> bool:
    """A bind to an IPv6 address failed because the namespace has no IPv6 at all."""
    return address.startswith("[") and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
