"""Plumbing of the aiohttp processes (the broker and the webhook): guarded sites and their bound
URLs, the one server-side TLS setup, the collector's settings after start-up.

How a process runs (event loop, signals, ready file, drain) is `metaproxy.process.serve`."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy.config import check_tls_pair, split_host_port
from metaproxy.net.connguard import ConnectionGuard, RejectResponse, canned_response

if TYPE_CHECKING:  # aiohttp is imported by the processes that serve with it, not the sidecar
    from aiohttp import web


# Python collects its youngest generation every 700 net allocations; a busy server allocates
# that many in a handful of requests. A larger threshold keeps young collections rarer (each
# one is still small), which measured about 8% of the broker's CPU under load.
YOUNG_GENERATION_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once start-up is done: move everything allocated so far (modules, config, policies) out of
    the collector's sight for good, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def bound_url(site: web.BaseSite, scheme: str) -> str:
    server = site._server  # aiohttp keeps the listening server here; port 0 needs the real one
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    if not sockets:
        return site.name
    sock: socket.socket = sockets[0]
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def start_site(
    runner: web.BaseRunner,
    address: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 1024,
    reuse_port: bool | None = None,
    guard: ConnectionGuard | None = None,
    reject: RejectResponse | None = None,
) -> tuple[web.BaseSite, str]:
    """Listen on `address`; with a `guard`, every connection is counted and capped from
    accept() on, before any TLS handshake (`metaproxy.net.listener`), and refused ones get
    `reject()` (a complete HTTP answer, inside TLS on a TLS listener) before being closed."""
    from aiohttp import web

    from metaproxy.net.webguard import GuardedTCPSite, GuardedUnixSite, refuse_unknown_expectations

    scheme = "https" if ssl_context else "http"
    assert runner.server is not None, "runner.setup() comes first"
    refuse_unknown_expectations(runner.server)
    site: web.BaseSite
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if guard is not None:
            site = GuardedUnixSite(
                runner,
                path,
                guard=guard,
                reject=reject or _default_reject,
                ssl_context=ssl_context,
                backlog=backlog,
            )
        else:
            site = web.UnixSite(runner, path, ssl_context=ssl_context, backlog=backlog)
    else:
        host, port = split_host_port(address)
        if guard is not None:
            site = GuardedTCPSite(
                runner,
                host,
                port,
                guard=guard,
                reject=reject or _default_reject,
                ssl_context=ssl_context,
                backlog=backlog,
                reuse_port=reuse_port,
            )
        else:
            site = web.TCPSite(
                runner, host, port, ssl_context=ssl_context, backlog=backlog, reuse_port=reuse_port
            )
    await site.start()
    return site, bound_url(site, scheme)


def _default_reject() -> bytes:
    return canned_response(429, "Too Many Requests", b"too many connections\n", "text/plain")


def server_tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The one server-side TLS setup (broker, webhook, and the broker's certificate reloader):
    TLS 1.2 or newer with the given chain and key; None (plain HTTP) only when neither is
    given. Half a pair is a ConfigError; a file that is not a PEM chain and its key is a
    StartError naming both flags; a missing or unreadable file is the OSError."""
    check_tls_pair(cert, key)
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        from metaproxy.errors import StartError

        raise StartError(
            f"--tls-cert/--tls-key: {cert}, {key}: not a PEM certificate chain and its key "
            f"({exc.reason or exc})"
        ) from None
    return context
