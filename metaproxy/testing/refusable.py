"""A listening port on 127.0.0.1 that can refuse connections and come back on the same port.

The fault proxy's `mode="refuse"` closes its listening socket, so connecting gets ECONNREFUSED
as from a stopped endpoint; `pass` listens again on the same port. Both switches are
synchronous: from the moment `refuse()` returns, new connections are refused, and from the
moment `listen_again()` returns, a client that connects waits in the backlog instead of being
refused, because the socket is bound and listening before the event loop accepts on it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable


class RefusablePort:
    """Serves `protocol_factory` on a port of 127.0.0.1 (`port`, or any free one)."""

    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol], port: int = 0) -> None:
        self._factory = protocol_factory
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        # Bound to listen again but not yet handed to the event loop.
        self._pending: socket.socket | None = None
        self._wanted = False

    async def listen(self) -> int:
        """Start listening; the port (chosen now when it was 0)."""
        self._loop = asyncio.get_running_loop()
        self._wanted = True
        self._server = await self._loop.create_server(self._factory, sock=self._bind())
        return self.port

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused from here on."""
        self._wanted = False
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    def listen_again(self) -> None:
        """After `refuse`, on the same port; call it on the port's event loop."""
        if self._wanted or self._loop is None:
            return
        self._wanted = True
        self._pending = sock = self._bind()
        task = self._loop.create_task(self._serve_on(sock))
        task.add_done_callback(_log_task_failure)

    async def _serve_on(self, sock: socket.socket) -> None:
        if sock is not self._pending:
            return  # refused again (and the socket closed) before this task ran
        self._pending = None
        assert self._loop is not None
        server = await self._loop.create_server(self._factory, sock=sock)
        if self._wanted:
            self._server = server
        else:
            server.close()  # refused again while we were starting up

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        loop = task.get_loop()
        loop.call_exception_handler(
            {"message": "fault proxy could not listen again", "exception": exc}
        )
