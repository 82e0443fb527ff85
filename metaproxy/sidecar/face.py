"""A face is one of the two APIs the task talks to — IMDS or container credentials — as one
frozen record: everything that differs between them, so that the data plane, the HTTP layer
and the connection guard never branch on which face they serve.

`imds.FACE` and `container_creds.FACE` are the two; `app.data_plane(state, face)` puts a face's
handler behind the rate limit and the DNS-rebinding check, and `server` listens with its error
page and its connection-cap answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from metaproxy.models import SidecarLimits
from metaproxy.sidecar.wire.messages import ErrorPage, Request, Response

if TYPE_CHECKING:
    from metaproxy.sidecar.state import SidecarState


@dataclass(frozen=True, slots=True)
class RateClass:
    """Requests limited together: one bucket per pod, its rate from the tenant's policy."""

    name: str  # also the `path_class` label of the sidecar's request metrics
    rate: Callable[[SidecarLimits], float]


@dataclass(frozen=True, slots=True)
class Face:
    name: Literal["imds", "container"]
    handle: Callable[[SidecarState, Request], Response | Awaitable[Response]]
    rate_class: Callable[[str], RateClass]  # by request path
    server: str  # the Server header: EC2's IMDS says `EC2ws`, ECS's endpoint names none ("")
    error_page: ErrorPage  # what the HTTP layer answers for requests it refuses itself
    too_many: Callable[[int], Response]  # the rate limit's refusal, given Retry-After seconds
    refused: Response  # a browser's request or a foreign Host (DNS rebinding): 403
    over_connection_cap: bytes  # the connection guard's whole answer past its caps (503)

    def refuse_connection(self) -> bytes:
        """`ConnectionGuard.protocol_factory(..., reject)`: the canned answer, then close."""
        return self.over_connection_cap
