"""Listening sockets for the sidecar's servers: TCP on an IP literal without a name lookup, or
a Unix socket, and the URL a bound one is reached at."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections.abc import Callable

from metaproxy.config import split_host_port
from metaproxy.net.connguard import ACCEPT_BACKLOG


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
        # asyncio's words, which `serve.describe_listen_error` reads the address from.
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(
            exc.errno, f"error while attempting to bind on address {(host, port)!r}: {reason}"
        ) from None
    sock.setblocking(False)
    return sock


def server_url(server: asyncio.Server) -> str:
    name = server.sockets[0].getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
