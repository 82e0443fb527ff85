"""The fault proxy's admin API, on its own port so that it stays reachable while the proxy's
port refuses connections (`mode="refuse"`).

JSON: `GET|POST /_fault` (read / change faults), `GET /_fault/stats`, `POST /_fault/reset`
(zero the counters; faults stay as they are). A bad change is a 400 naming the bad key or
value, and changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Protocol

from aiohttp import web

from metaproxy.testing.faults import Faults

ADMIN_PREFIX = "/_fault"
MAX_BODY_BYTES = 64 * 1024


class Controlled(Protocol):
    """What the admin API reads and changes (`FaultProxy`)."""

    @property
    def faults(self) -> Faults: ...

    def set(self, **faults: object) -> None: ...

    def stats(self) -> dict[str, object]: ...

    def reset_counters(self) -> None: ...


def is_admin_path(path: str) -> bool:
    """Whether a path on the proxy's port would be an admin path (it is never forwarded)."""
    # `//_fault` and `/%5Ffault` reach the same place on some upstreams; refuse them all.
    stripped = "/" + path.lstrip("/")
    return stripped == ADMIN_PREFIX or stripped.startswith(ADMIN_PREFIX + "/")


def admin_app(proxy: Controlled) -> web.Application:
    async def get_faults(_request: web.Request) -> web.Response:
        return web.json_response(asdict(proxy.faults))

    async def set_faults(request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            proxy.set(**changes)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(proxy.faults))

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(proxy.stats())

    async def reset(_request: web.Request) -> web.Response:
        proxy.reset_counters()
        return web.json_response(proxy.stats())

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get(ADMIN_PREFIX, get_faults)
    app.router.add_post(ADMIN_PREFIX, set_faults)
    app.router.add_get(ADMIN_PREFIX + "/stats", stats)
    app.router.add_post(ADMIN_PREFIX + "/reset", reset)
    return app
