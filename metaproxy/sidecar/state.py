"""What one sidecar's parts share: its config, token authority, credential keeper, broker client
and metrics, and the caches and guards its faces use. Nothing of a sidecar is a module global:
two sidecars in one process (the tests, the demo) share no cache, counter or limiter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from metaproxy.clock import Clock
from metaproxy.sidecar.broker_client import BrokerClient, Grant
from metaproxy.sidecar.config import SidecarConfig
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.lifecycle import TerminationNotice
from metaproxy.sidecar.metrics import SidecarMetrics
from metaproxy.sidecar.rebinding import HostCheck
from metaproxy.sidecar.tokens import TokenAuthority

if TYPE_CHECKING:
    from metaproxy.sidecar.host_metadata import HostMetadata
    from metaproxy.sidecar.imds_view import ImdsView
    from metaproxy.sidecar.link_local import LinkLocalCheck
    from metaproxy.sidecar.wire.messages import Response

T = TypeVar("T")


class PerGrant(Generic[T]):
    """What a face renders from the current grant (a credential document, the metadata tree),
    made once per credential set — they change every half hour — not once per request."""

    __slots__ = ("_grant", "_render", "_value")

    def __init__(self, render: Callable[[Grant], T]) -> None:
        self._render = render
        self._grant: Grant | None = None
        self._value: T | None = None

    def __call__(self, grant: Grant) -> T:
        value = self._value
        if value is None or self._grant is not grant:
            value = self._value = self._render(grant)
            self._grant = grant
        return value

    @property
    def value(self) -> T | None:
        """What was rendered last (None after `invalidate`), without rendering."""
        return self._value

    def invalidate(self) -> None:
        """Render again on the next call: something besides the grant changed (the task began
        to stop, so the view gains EC2's termination notices)."""
        self._value = None


class ConnectionCounts(Protocol):
    """What a connection guard tells `/metrics` (`metaproxy.net.connguard.ConnectionGuard`)."""

    @property
    def open(self) -> int: ...

    @property
    def cap(self) -> int: ...

    @property
    def fd_budget(self) -> int: ...


@dataclass
class SidecarState:
    config: SidecarConfig
    tokens: TokenAuthority
    keeper: CredentialKeeper
    authorization_token: str
    client: BrokerClient
    metrics: SidecarMetrics
    imds_view: PerGrant[ImdsView]
    container_document: PerGrant[Response]
    hosts: HostCheck  # DNS rebinding: the Host values this sidecar answers
    clock: Clock
    notice: TerminationNotice  # set at SIGTERM: the view announces the task's end
    started: str  # when the sidecar started, HTTP date: `Last-Modified` of the version lists
    relative_path: bytes = b""  # the container endpoint's secret path (RELATIVE_URI), or none
    limiters: dict[str, FairShare] = field(default_factory=dict)  # by path class
    host_metadata: HostMetadata | None = None  # only with an allow-list (`--host-metadata-allow`)
    link_local: LinkLocalCheck | None = None  # only with `--link-local-check`
    # The server's connection guards, task-facing first (counted at scrape time).
    guards: tuple[ConnectionCounts, ...] = ()
    draining: bool = False

    def begin_termination(self) -> None:
        """SIGTERM: the task is stopping. IMDS announces it as EC2 announces an instance's end
        (`spot/instance-action`, `autoscaling/target-lifecycle-state`) for the rest of the drain."""
        self.notice.begin(self.clock.now(), self.config.drain_seconds)
        self.imds_view.invalidate()
