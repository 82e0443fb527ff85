"""What the sidecar's handlers share: config, the token authority, the credential keeper."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from metaproxy.config import SidecarConfig
from metaproxy.sidecar.broker_client import BrokerClient
from metaproxy.sidecar.credentials_cache import CredentialKeeper
from metaproxy.sidecar.fairness import FairShare
from metaproxy.sidecar.tokens import TokenAuthority


@dataclass
class SidecarState:
    config: SidecarConfig
    tokens: TokenAuthority
    keeper: CredentialKeeper
    authorization_token: str
    client: BrokerClient
    limiters: dict[str, FairShare] = field(default_factory=dict)  # by path class
    host_metadata: Callable[[str], Awaitable[str | None]] = field(default=lambda _p: _none())
    draining: bool = False


async def _none() -> str | None:
    return None
