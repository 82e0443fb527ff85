"""The admin port: `/healthz`, `/readyz` and `/metrics`. It changes nothing.

`Probe` answers the health probes, here and (past the admin port's connection cap) from the
connection guard itself, so a probe is never refused.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from metaproxy.broker.instrument import METRICS
from metaproxy.broker.metrics import BrokerMetrics
from metaproxy.net.httperrors import identity_encoding_only, json_errors
from metaproxy.net.webguard import body_deadline


class ViewHealth(Protocol):
    def problem(self) -> str:
        """Why the revocation view cannot be trusted now, in one line; "" when it can."""
        ...


class Probe:
    def __init__(self, revocations: ViewHealth) -> None:
        self._revocations = revocations
        self.draining = False

    def answer(self, path: str) -> tuple[int, str] | None:
        """The answer to a health probe (status, text), or None if `path` is not one."""
        if path == "/healthz":
            return 200, "ok"
        if path != "/readyz":
            return None
        if self.draining:
            return 503, "draining"
        problem = self._revocations.problem()
        if problem:
            # A replica that cannot read the revocations cannot tell a revoked task from another.
            return 503, problem
        return 200, "ready"


PROBE = web.AppKey("probe", Probe)


async def probe(request: web.Request) -> web.Response:
    answer = request.app[PROBE].answer(request.path)
    assert answer is not None  # routed here for a probe path
    return web.Response(status=answer[0], text=answer[1])


async def metrics(request: web.Request) -> web.Response:
    broker_metrics = request.app[METRICS]
    return web.Response(
        body=broker_metrics.render(), headers={"Content-Type": broker_metrics.content_type}
    )


def build_admin_app(
    probe_: Probe, metrics_: BrokerMetrics, *, header_timeout: float
) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, identity_encoding_only, body_deadline(header_timeout)],
        client_max_size=4096,
    )
    app[PROBE] = probe_
    app[METRICS] = metrics_
    app.router.add_get("/healthz", probe)
    app.router.add_get("/readyz", probe)
    app.router.add_get("/metrics", metrics)
    return app
