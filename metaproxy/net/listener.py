"""Guarded listeners: our own accept loop, so that the connection guard counts every socket from
accept() on — a TLS handshake in progress included — and no socket is held that it cannot see.

With `loop.create_server(ssl=...)` the loop made the TLS handshake before the guard's protocol
saw the connection: a TCP connection that never sent its ClientHello counted against no cap and
held a descriptor until the handshake timeout, so a flood of them used up RLIMIT_NOFILE (accept
and the policy reloader's open() then failed with EMFILE). Making the handshake behind the guard
with `loop.start_tls` raced on uvloop, which delivered the ClientHello to the plain protocol
before start_tls took over. Here the guard decides on the raw socket, peer address known, before
a byte is read (`GuardedProtocol.accepted`); the socket then goes to the public
`loop.connect_accepted_socket` (asyncio and uvloop alike), where the loop makes the handshake
within the header deadline. The slot is freed when the handshake fails, times out or is aborted
(eviction, shutdown), or when the connection ends.

A refused socket on a TLS listener cannot be told why in plaintext: a TLS client reads a
plaintext 429 as a failed handshake and typically reconnects at once. It gets the handshake and
the 429 with its Retry-After inside TLS, so a sidecar backs off — but only within the guard's
COURTESY_MAX allowance (inside FD_RESERVE), each under the handshake deadline. Past that it is
closed at once: a flood of refused sockets costs neither handshakes nor descriptors.

No web framework here: `metaproxy.net.webguard`'s sites put aiohttp's server behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from metaproxy.net.connguard import ACCEPT_BACKLOG, ConnectionGuard, GuardedProtocol, RejectResponse

# Errors accept() reports for a connection that died in the queue (Linux passes pending network
# errors on the new socket through accept): the next one may be fine.
_PEER_GONE = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EPERM,  # a firewall rule refused it
    }
)
# After any other accept error (EMFILE, ENFILE, ENOBUFS …) the listener stops accepting this long
# instead of spinning on a readable socket; waiting connections stay in the kernel's queue.
ACCEPT_PAUSE = 0.5

log = logging.getLogger("metaproxy.net.connguard")


class GuardedListener(asyncio.AbstractServer):
    """Listening sockets whose connections are counted by `guard` from accept() on, then served
    by `server`'s protocols (through TLS with `ssl_context`). An `asyncio.AbstractServer`, so an
    aiohttp site can keep it where it keeps the loop's server."""

    def __init__(
        self,
        sockets: list[socket.socket],
        guard: ConnectionGuard,
        server: Callable[[], asyncio.Protocol],
        reject: RejectResponse,
        *,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._sockets = sockets
        self._guard = guard
        self._server = server
        self._reject = reject
        # The context object itself, never a copy: broker/tls.py loads rotated certificates into
        # it, and the next handshake uses them.
        self._ssl = ssl_context
        self._tls: dict[str, Any] = {}
        if ssl_context is not None:
            self._tls["ssl"] = ssl_context
            if guard.header_timeout > 0:
                # The handshake has the header deadline, and so has the TLS close: asyncio would
                # wait 30 s for a silent peer's close_notify, holding the slot and descriptor.
                self._tls["ssl_handshake_timeout"] = guard.header_timeout
                self._tls["ssl_shutdown_timeout"] = guard.header_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        self._serving = False

    @classmethod
    async def tcp(
        cls,
        host: str | None,
        port: int,
        guard: ConnectionGuard,
        server: Callable[[], asyncio.Protocol],
        reject: RejectResponse,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
    ) -> GuardedListener:
        """Bound to every address `host` resolves to, as `loop.create_server` would be."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                if reuse_address is not False:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # One socket per family, as asyncio does: "::" must not also take IPv4.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    # asyncio's wording: `serve.describe_listen_error` reads the address back.
                    reason = (exc.strerror or str(exc)).lower()
                    message = f"error while attempting to bind on address {address!r}: {reason}"
                    raise OSError(exc.errno, message) from None
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, guard, server, reject, ssl_context=ssl_context)

    @classmethod
    def unix(
        cls,
        path: str,
        guard: ConnectionGuard,
        server: Callable[[], asyncio.Protocol],
        reject: RejectResponse,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int,
    ) -> GuardedListener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls([sock], guard, server, reject, ssl_context=ssl_context)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop or asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        self._loop = asyncio.get_running_loop()
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and abort the handshakes in progress. Connections already handed to
        the server stay open: closing them is the server's (aiohttp's `shutdown`)."""
        if self._loop is not None:
            for sock in self._sockets:
                if sock.fileno() != -1 and sock not in self._paused:
                    self._loop.remove_reader(sock.fileno())
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        for sock in self._sockets:
            sock.close()
        self._serving = False
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _accept(self, listening: socket.socket) -> None:
        # At most ACCEPT_BACKLOG per wake-up, so a storm cannot keep the loop from serving.
        for _ in range(ACCEPT_BACKLOG):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                self._pause(listening, exc)
                return
            self._admit(sock, peer)

    def _pause(self, listening: socket.socket, exc: OSError) -> None:
        """With the descriptor budget true this does not happen; if it does (a leak elsewhere,
        a limit lowered under us), back off instead of spinning, and say so."""
        log.warning(
            "%s: accept failed (%s); not accepting for %.1fs", self._guard.name, exc, ACCEPT_PAUSE
        )
        assert self._loop is not None
        self._loop.remove_reader(listening.fileno())
        self._paused[listening] = self._loop.call_later(ACCEPT_PAUSE, self._resume, listening)

    def _resume(self, listening: socket.socket) -> None:
        del self._paused[listening]
        if self._serving and self._loop is not None:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _admit(self, sock: socket.socket, peer: object) -> None:
        sock.setblocking(False)
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""  # "" for Unix peers
        protocol = GuardedProtocol(self._guard, self._server, self._reject)
        if not protocol.accepted(client, handshake=self._ssl is not None):
            if self._ssl is None:
                # A few hundred bytes into an empty send buffer: written whole or not at all.
                with contextlib.suppress(OSError):
                    sock.send(self._reject())
            sock.close()
            return
        loop = self._loop
        assert loop is not None
        started = False

        async def hand_over() -> None:
            nonlocal started
            started = True  # from here the loop owns the socket, and closes it on failure
            try:
                await loop.connect_accepted_socket(lambda: protocol, sock, **self._tls)
            except Exception as exc:  # a reset, a timeout, a ClientHello that is not TLS …
                log.debug("%s: handshake with %s failed: %r", self._guard.name, client, exc)
                protocol.handshake_failed()

        def done(task: asyncio.Task[None]) -> None:
            self._handshakes.discard(task)
            if task.cancelled():
                protocol.handshake_failed()
                if not started:
                    sock.close()

        task = loop.create_task(hand_over())
        self._handshakes.add(task)
        task.add_done_callback(done)
        protocol.abort_handshake = task.cancel
