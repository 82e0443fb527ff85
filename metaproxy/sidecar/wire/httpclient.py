"""The sidecar's HTTP/1.1 client: one kept-alive connection, TLS or plain or a Unix socket.

Why not aiohttp: the sidecar asks its broker one question a minute and the host's IMDS a few
more; a client framework costs every pod about 10 MB of memory for that (issue 13). This is
asyncio streams, the standard `ssl` module and the response half of httptools (llhttp), the
parser the sidecar's server already uses.

- One connection, reused while the server keeps it alive; a request that fails on a reused
  connection before any answer came back is sent again once on a new one (the server may have
  closed it while idle — the request never reached it).
- The caller bounds each request in time (`asyncio.timeout`); the answer's size is capped here.
- Errors are the standard ones: `OSError` (connect, reset, refused), `ssl.SSLError` (and its
  `SSLCertVerificationError`, whose `verify_message` says why), `HttpClientError` for an answer
  that is not HTTP or too large.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httptools

MAX_ANSWER_BYTES = 1024 * 1024


class HttpClientError(Exception):
    """The server's answer is not an HTTP/1.1 response we accept (malformed or too large)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect: host and port (TLS when `tls` is set), or a Unix socket."""

    host: str
    port: int
    tls: bool = False
    socket: Path | None = None
    interface: str | None = None  # leave through this interface (SO_BINDTODEVICE)

    @property
    def host_header(self) -> str:
        if self.socket is not None:
            return "localhost"
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(slots=True)
class _Parse:
    """httptools callbacks collecting one response."""

    limit: int = MAX_ANSWER_BYTES
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    done: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.limit:
            raise HttpClientError(f"answer larger than {self.limit} bytes")

    def on_message_complete(self) -> None:
        self.done = True

    def finished(self) -> bool:
        return self.done


class _ClosedEarly(ConnectionResetError):
    """The server closed the connection before a whole answer; `answered`: after some of it."""

    def __init__(self, *, answered: bool) -> None:
        super().__init__("connection closed before a full answer")
        self.answered = answered


class HttpClient:
    """`await client.request("POST", "/v1/credentials", headers, body)` → `Answer`."""

    def __init__(self, endpoint: Endpoint, *, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.endpoint = endpoint
        self._max_answer_bytes = max_answer_bytes
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        tls: ssl.SSLContext | None = None,
    ) -> Answer:
        """One request; `tls` is the context for a new TLS connection (required for TLS)."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.endpoint.host_header}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with self._lock:
            reused = self._streams is not None
            try:
                return await self._exchange(raw, tls)
            except OSError as exc:
                self.close()
                if not reused or (isinstance(exc, _ClosedEarly) and exc.answered):
                    raise
            return await self._exchange(raw, tls)

    async def _exchange(self, raw: bytes, tls: ssl.SSLContext | None) -> Answer:
        reader, writer = self._streams or await self._connect(tls)
        self._streams = (reader, writer)
        writer.write(raw)
        await writer.drain()
        parse = _Parse(self._max_answer_bytes)
        parser = httptools.HttpResponseParser(parse)
        received = False
        try:
            while not parse.finished():
                chunk = await reader.read(65536)
                if chunk:
                    received = True
                    parser.feed_data(chunk)
                    continue
                if received:
                    parser.feed_data(b"")  # a body delimited by the close ends here
                if not parse.finished():
                    raise _ClosedEarly(answered=received)
        except httptools.HttpParserError as exc:
            self.close()
            if isinstance(exc.__context__, HttpClientError):
                raise exc.__context__ from None
            raise HttpClientError(f"malformed HTTP answer: {exc}") from None
        except BaseException:
            self.close()
            raise
        if not parser.should_keep_alive():
            self.close()
        return Answer(parser.get_status_code(), parse.headers, bytes(parse.body))

    async def _connect(
        self, tls: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        endpoint = self.endpoint
        if endpoint.socket is not None:
            return await asyncio.open_unix_connection(str(endpoint.socket))
        if endpoint.tls:
            if tls is None:
                raise ValueError("a TLS endpoint needs an SSL context")
            return await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=tls, server_hostname=endpoint.host
            )
        if endpoint.interface is not None:
            return await asyncio.open_connection(sock=await _bound_socket(endpoint))
        return await asyncio.open_connection(endpoint.host, endpoint.port)

    def close(self) -> None:
        """Drop the kept-alive connection (the next request opens a new one)."""
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            with contextlib.suppress(Exception):
                writer.close()

    async def aclose(self) -> None:
        streams = self._streams
        self.close()
        if streams is not None:
            with contextlib.suppress(Exception):
                await streams[1].wait_closed()


async def _bound_socket(endpoint: Endpoint) -> socket.socket:
    """A socket connected to the endpoint's IP literal through `endpoint.interface`."""
    assert endpoint.interface is not None
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, endpoint.interface.encode())
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (endpoint.host, endpoint.port))
    except BaseException:
        sock.close()
        raise
    return sock
