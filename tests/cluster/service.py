"""A Service as kube-proxy makes it: a virtual address in the node, forwarding to endpoints.

Each new connection goes to the next ready endpoint in turn; an established connection keeps its
endpoint until either end closes it, as conntrack keeps it with kube-proxy's rules. Taking an
endpoint out (a pod that is terminating) only stops new connections reaching it, as the
endpoints controller does. Endpoints are pods in the node (`in_node`), or a server of the host
(moto, standing in for AWS's public endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections import Counter
from pathlib import Path

from tests.podlab import socket_in

Endpoint = tuple[str, int]
CHUNK = 65536


class NoEndpoints(ConnectionError):
    """The Service has no ready endpoint: the connection is refused, as kube-proxy rejects it."""


class Service:
    def __init__(self, netns: Path, address: str, port: int, *, in_node: bool = True) -> None:
        self.netns, self.address, self.port, self._in_node = netns, address, port, in_node
        self._endpoints: list[Endpoint] = []
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections: Counter[Endpoint] = Counter()  # every connection, by endpoint

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        self._endpoints = list(endpoints)

    async def start(self) -> None:
        sock = socket_in(self.netns)  # the node's: the address is on the node's lo
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        self._server = await asyncio.start_server(self._accepted, sock=sock)

    async def _connect(
        self, endpoint: Endpoint
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not self._in_node:
            return await asyncio.open_connection(*endpoint)
        sock = await asyncio.to_thread(socket_in, self.netns)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, endpoint)
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            if not self._endpoints:
                raise NoEndpoints(f"{self.address}:{self.port} has no ready endpoint")
            endpoint = self._endpoints[next(self._turn) % len(self._endpoints)]
            self.connections[endpoint] += 1
            upstream_reader, upstream_writer = await self._connect(endpoint)
        except OSError:
            writer.close()
            self._pipes.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        finally:
            for w in (writer, upstream_writer):
                w.close()
            self._pipes.discard(task)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; a reset on either side ends the copy."""
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
