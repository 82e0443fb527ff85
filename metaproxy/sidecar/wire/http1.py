"""A small HTTP/1.1 server for the sidecar's data plane (IMDS and container credentials).

Why not aiohttp here: every task runs a sidecar, and its hot path is one tiny GET. A general
framework spends most of its time on machinery this path does not need (routing, middleware
chains, a Request object per call), and it has no deadline for reading headers — a slow client
holds its socket forever, which is how a shared metadata service once ran out of descriptors.
This server parses with httptools (llhttp, the parser Node.js uses), answers from prepared bytes,
and enforces per-request limits: a deadline for every request head (not only the first) and for
every announced body, a keep-alive idle timeout, and limits on URL, header and body sizes.
Rejecting excess costs one write and a close. Connection admission (caps in total and per client,
eviction, the descriptor budget) is `metaproxy.net.connguard`, which wraps this protocol; since this
protocol times every head itself, the guard times only the first (`KeepsHeadDeadlines`).

Beside this module: `messages` (Request, Response, the limits), `connections` (the tracker of
every connection's deadline, the Date line, the drain) and `flow` (when a connection is read).

The hot path is a cached answer to the same request, over and over: a response's whole bytes
(status, Server and Date, its headers, its body) are kept for the current second, request
paths are decoded once, and no per-request object is made that a kept one can stand in for.
A client asks the same request again and again (an SDK polling, a tool looping), so a
connection remembers its last request's bytes once the parser has read them (`_Repeat`): a
read that holds nothing but those bytes, once or several times pipelined, is those requests
again, and is answered without feeding the parser — bytes it has already judged, that it would
judge the same way from the same state (between two messages). The parser's callbacks were
half of the cost of an answer. When nothing is owed before them, the copies of one read go to
the repeat handler once, with their count (`RepeatHandler`: the data plane takes each copy from
the rate limit and judges them at one instant), and its answer is written once per copy; a
Request object and a handler call per copy were most of what was left.

One module over 400 lines: parsing, the deadlines, the queue and the repeated-request path all
read and write one connection's state, and the hot path is kept inline in it (a call across
modules per read is a measurable share of an answer, issue 19).
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

import httptools

from metaproxy.sidecar.wire.connections import ConnectionTracker
from metaproxy.sidecar.wire.flow import FlowControl
from metaproxy.sidecar.wire.messages import ErrorPage, Handler, RepeatHandler, Request, Response

log = logging.getLogger("metaproxy.sidecar.http")

MAX_PIPELINED = 16  # requests queued on one connection before we stop reading from it
MAX_CACHED_PATHS = 256  # decoded request targets kept (an SDK asks the same few paths)
_NO_DUPLICATES: frozenset[str] = frozenset()
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH")}


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


class _Repeat(typing.NamedTuple):
    """A connection's last request, if a read held nothing else (see the module's docstring):
    its bytes and what the parser made of them. Only a body-less, kept-alive request."""

    raw: bytes
    # What the parser made of it; its headers are shared by every repeat: read-only for
    # handlers. Handed to the repeat handler as it is (only `extra_head` is the handler's).
    request: Request


MAX_REPEAT_BYTES = 4096  # a read longer than this is not remembered (a pod holds many connections)
_NO_COPIES = (b"", 0)
_NEVER = float("inf")


class HttpProtocol(asyncio.Protocol):
    """One connection. Requests are answered in order; a pipelined burst is bounded."""

    # Slots: one of these per open connection, and a pod may hold hundreds.
    __slots__ = (
        "_answered", "_body_bytes", "_busy", "_client", "_completed", "_copies", "_duplicates",
        "_error_page",
        "_flow", "_had_head", "_handler", "_header_bytes", "_headers", "_in_message", "_last",
        "_limits", "_loop", "_parser", "_queue", "_repeat", "_repeats", "_server", "_tracker",
        "_transport", "_url", "deadline", "number", "reading_body", "reading_head",
    )  # fmt: skip
    _flow: FlowControl  # from connection_made on

    def __init__(
        self,
        handler: Handler,
        tracker: ConnectionTracker,
        error_page: ErrorPage,
        server: str = "EC2ws",
        repeats: RepeatHandler | None = None,
    ) -> None:
        self._handler = handler
        self._repeats = repeats  # answers a read of repeats at once (else each is `handler`'s)
        self._server = server  # the Server header's value; "" sends none
        self._tracker = tracker
        tracker.date_line(server)  # this server's Date line is kept from now on (`_write`)
        self._limits = tracker.limits
        self._error_page = error_page
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._client = ""
        self.number = 0
        # Requests read and not yet answered, a few (reading pauses at MAX_PIPELINED): a list, not
        # a deque, whose first block is most of a kilobyte in every connection (issue 19).
        self._queue: list[tuple[Request, bool]] = []
        self._busy: asyncio.Task[None] | None = None
        self.deadline = _NEVER
        self._answered = self._loop.time()  # the last answer written (or the connection made)
        self.reading_head = False
        # An announced body that never arrives must not hold the socket: 64 such connections
        # once locked every other container of a pod out of its credentials.
        self.reading_body = False
        self._had_head = False
        self._in_message = False  # the parser is inside a message (between begin and complete)
        self._completed = 0  # messages completed by the current read
        self._last: _Repeat | None = None  # the last message completed, if it may repeat
        self._repeat: _Repeat | None = None
        # The last read of several copies of `_repeat` and their count (`_repeated`): the
        # next read of as many is then one comparison.
        self._copies = _NO_COPIES
        self._reset_message()

    # -- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else "unix"
        self._transport = transport
        self._flow = FlowControl(transport)
        self._tracker.connections.add(self)
        self._tracker.accepted += 1
        self.number = self._tracker.accepted
        transport.set_write_buffer_limits(high=64 * 1024)
        # A new connection must send its request head within the header deadline.
        self.reading_head = True
        self.deadline = self._loop.time() + self._limits.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._transport = None
        # The parser holds this protocol's bound methods (its callbacks): a reference cycle,
        # which refcounting never frees. A connection that lived a few seconds is in the
        # collector's oldest generation by now, collected rarely: every closed connection's
        # protocol, parser and buffers would stay in the pod's memory until then (issue 13).
        del self._parser
        self._tracker.connections.discard(self)
        self._tracker.note_progress()
        if self._busy is not None:
            self._busy.cancel()
        self._queue.clear()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        if self._transport is not None:
            self._flow.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._flow.resume_writing()
            if len(self._queue) < MAX_PIPELINED:
                self._flow.resume_reading()

    @property
    def idle(self) -> bool:
        return (
            self._busy is None
            and not self._queue
            and not self.reading_head
            and not self.reading_body
        )

    @property
    def idle_since(self) -> float | None:
        """Since when no answer has been owed (None while one is): the connection guard closes
        the connection idle the longest to admit a new one (`connguard.Evictable`)."""
        return self._answered if self._busy is None and not self._queue else None

    @property
    def awaiting_first_head(self) -> bool:
        """`connguard.KeepsHeadDeadlines`: the guard times the first head, this protocol the
        rest."""
        return not self._had_head

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def time_out(self) -> None:
        """The sweeper found this connection past its deadline: a request that did not arrive
        in time gets 408, an idle kept-alive connection is just closed."""
        if self.reading_head or self.reading_body:
            self._tracker.on_reject("header_timeout" if self.reading_head else "body_timeout")
            self._fail(408)
        else:
            self._tracker.on_reject("idle_timeout")
            self.close()

    def _start_head(self) -> None:
        self.reading_head = True
        self.deadline = self._loop.time() + self._limits.header_timeout

    def data_received(self, data: bytes) -> None:
        between_messages = not self._in_message
        if between_messages:
            repeat = self._repeat
            if repeat is not None and self._repeated(repeat, data):
                return  # whole requests: no head deadline to start
            self._completed = 0
        # Any byte after an idle spell starts the head deadline, even bytes the parser skips
        # (blank lines before a request line), so they cannot keep a connection alive for free.
        if self.idle:
            self._start_head()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or `Upgrade:`: nothing here speaks anything but plain HTTP/1.1.
            self._tracker.on_reject("bad_request")
            self._fail(400)
        except (_Reject, httptools.HttpParserError) as exc:
            # httptools re-raises a callback's exception wrapped; find our own status in it.
            reject = exc if isinstance(exc, _Reject) else exc.__context__
            self._tracker.on_reject("bad_request")
            self._fail(reject.status if isinstance(reject, _Reject) else 400)
            return
        if between_messages and self._completed and not self._in_message:
            self._remember(data)

    def _repeated(self, repeat: _Repeat, data: bytes) -> bool:  # noqa: PLR0912 - inlined
        """Whether `data` is the connection's last request again, once or more; if so, those
        requests are taken as the parser would have taken them."""
        raw = repeat.raw
        if data == raw:
            count = 1
        elif data == self._copies[0]:
            count = self._copies[1]  # as many copies as the last read that held several
        else:
            count, rest = divmod(len(data), len(raw))
            if rest or count < 2 or data != raw * count:
                return False
            if len(data) <= MAX_REPEAT_BYTES:
                self._copies = (data, count)
        # A whole head in one read: its deadline is met.
        self.reading_head = False
        self._had_head = True
        self.deadline = _NEVER
        request = repeat.request
        if self._busy is None and not self._queue and self._repeats is not None:
            # Nothing owed before them: the copies are answered at once, as one.
            request.extra_head = b""
            try:
                result = self._repeats(request, count)
            except Exception:
                log.exception("handler failed on %s %s", request.method, request.path[:200])
                result = self._error_page(500)
            if isinstance(result, Response):
                transport = self._transport
                if count == 1 or transport is None or request.method == "HEAD":
                    self._write_copies(request, result, count)
                    self._settle()
                    return True
                # `_write_copies` and `_settle`, inlined for the hot path.
                date_line, extra = self._tracker.date_lines[self._server], request.extra_head
                wire = result.wire
                if wire is not None and wire[0] is date_line and wire[1] == extra:
                    answer = wire[2]
                else:
                    answer = result.keep_alive_bytes(date_line, extra)
                write = transport.write
                for _ in range(count):
                    write(answer)
                now = self._answered = self._tracker.last_answer = self._loop.time()
                if self._flow.reading and not self._tracker.draining:
                    self.deadline = now + self._limits.keepalive_timeout
                else:
                    self._settle()
                return True
            if result is not None:
                self._busy = self._loop.create_task(self._finish(request, result, True, count))
                return True
        queue, number = self._queue, self.number
        method, path, headers = request.method, request.path, request.headers
        client, duplicates = request.remote, request.duplicate_headers
        for _ in range(count):
            queue.append((Request(method, path, headers, client, duplicates, number), True))
        if len(queue) >= MAX_PIPELINED and self._transport is not None:
            self._flow.pause_reading()
        if self._busy is None:
            self._drain_queue()
        return True

    def _remember(self, data: bytes) -> None:
        """After a read that ended between two messages: if it held nothing but copies of one
        body-less, kept-alive request, remember that request's bytes (`_repeated`)."""
        last, count = self._last, self._completed
        self._repeat = None
        if last is None or len(data) > MAX_REPEAT_BYTES or self._transport is None:
            return
        size, rest = divmod(len(data), count)
        if rest:
            return
        raw = data[:size] if count > 1 else data
        if count > 1 and data != raw * count:
            return
        self._repeat = last._replace(raw=raw)
        self._copies = _NO_COPIES

    # -- parser callbacks ---------------------------------------------------------------

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._duplicates: set[str] | None = None  # made for the first one: they are rare
        self._header_bytes = 0
        self._body_bytes = 0

    def on_message_begin(self) -> None:
        self._in_message = True
        self._reset_message()
        # A pipelined head that starts while an earlier request is being answered has the
        # deadline too (data_received only starts it on an idle connection).
        if not self.reading_head:
            self._start_head()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url_bytes:
            raise _Reject(414, "url")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes:
            raise _Reject(431, "header bytes")
        if len(self._headers) >= self._limits.max_headers:
            raise _Reject(431, "header count")
        try:
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
        except UnicodeDecodeError:
            raise _Reject(400, "header name") from None
        if key in self._headers:
            if self._duplicates is None:
                self._duplicates = set()
            self._duplicates.add(key)
        self._headers[key] = text

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self._had_head = True
        self.deadline = _NEVER
        length = self._headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self._limits.max_body_bytes:
            raise _Reject(413, "body")
        if int(length) or "transfer-encoding" in self._headers:
            # The body has its own deadline, as long as the head's, from the end of the head.
            self.reading_body = True
            self.deadline = self._loop.time() + self._limits.header_timeout

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Reject(413, "body")

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed += 1
        had_body = self.reading_body
        if had_body:
            self.reading_body = False
            self.deadline = _NEVER
        method = self._parser.get_method()
        paths = self._tracker.paths
        path = paths.get(self._url)
        if path is None:
            path = _path(self._url)
            if len(paths) >= MAX_CACHED_PATHS:
                paths.clear()
            paths[self._url] = path
        request = Request(
            _METHODS.get(method) or method.decode("ascii", "replace"),
            path,
            self._headers,
            self._client,
            frozenset(self._duplicates) if self._duplicates else _NO_DUPLICATES,
            self.number,
        )
        keep_alive = self._parser.should_keep_alive()
        headers = self._headers
        may_repeat = (
            keep_alive
            and not had_body
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        self._last = _Repeat(b"", request) if may_repeat else None
        self._take(request, keep_alive)

    def _take(self, request: Request, keep_alive: bool) -> None:
        """A whole request read: queue it, answer it if it is next."""
        self._queue.append((request, keep_alive))
        if len(self._queue) >= MAX_PIPELINED and self._transport is not None:
            self._flow.pause_reading()
        if self._busy is None:
            self._drain_queue()

    # -- answering ----------------------------------------------------------------------

    def _drain_queue(self) -> None:
        while self._queue and self._transport is not None:
            request, keep_alive = self._queue.pop(0)
            try:
                result = self._handler(request)
            except Exception:
                log.exception("handler failed on %s %s", request.method, request.path[:200])
                result = self._error_page(500)
            if isinstance(result, Response):
                self._write(request, result, keep_alive)
                continue
            self._busy = self._loop.create_task(self._finish(request, result, keep_alive))
            return
        self._settle()

    def _settle(self) -> None:
        """Nothing more owed: read again, and keep the connection alive (or close it, draining)."""
        if self._transport is None:
            return
        if not self._flow.reading:
            self._flow.resume_reading()
        if not self.reading_head and not self.reading_body:
            if self._tracker.draining:
                self._transport.close()
                self._tracker.note_progress()
                return
            self.deadline = self._loop.time() + self._limits.keepalive_timeout

    async def _finish(
        self, request: Request, pending: Awaitable[Response], keep_alive: bool, copies: int = 1
    ) -> None:
        try:
            response = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.path[:200])
            response = self._error_page(500)
        self._busy = None
        self._write_copies(request, response, copies, keep_alive)
        self._drain_queue()

    def _write_copies(
        self, request: Request, response: Response, copies: int, keep_alive: bool = True
    ) -> None:
        """`response` to each of `copies` of `request`: one write per answer, as ever."""
        transport = self._transport
        if copies == 1 or transport is None or not keep_alive or request.method == "HEAD":
            for _ in range(copies):
                self._write(request, response, keep_alive)
            return
        data = response.keep_alive_bytes(self._tracker.date_lines[self._server], request.extra_head)
        write = transport.write
        for _ in range(copies):
            write(data)
        self._answered = self._tracker.last_answer = self._loop.time()

    def _write(self, request: Request, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        date_line = self._tracker.date_lines[self._server]
        if keep_alive and request.method != "HEAD":
            transport.write(response.keep_alive_bytes(date_line, request.extra_head))
            self._answered = self._tracker.last_answer = self._loop.time()
            return
        status, fields = response.encoded_head()
        head = [status, request.extra_head, fields, date_line]
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if request.method != "HEAD":
            head.append(response.body)
        transport.write(b"".join(head))
        self._answered = self._tracker.last_answer = self._loop.time()
        if not keep_alive:
            transport.close()

    def _fail(self, status: int) -> None:
        """Answer a request we could not parse or will not take, then close."""
        transport = self._transport
        if transport is None:
            return
        self._queue.clear()
        page = self._error_page(status)
        bogus = Request("GET", "", {}, self._client)
        self._write(bogus, page, keep_alive=False)
        transport.close()


def _path(url: bytes) -> str:
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return "\x00invalid"
    raw: bytes = parsed.path or b"/"
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\x00invalid"


def protocol_factory(
    handler: Handler,
    tracker: ConnectionTracker,
    error_page: ErrorPage,
    server: str = "EC2ws",
    repeats: RepeatHandler | None = None,
) -> Callable[[], HttpProtocol]:
    """What `loop.create_server` (or a connection guard wrapping it) builds per connection;
    `server` is the Server header's value ("" for none); `repeats` answers a read of copies of
    one request at once (`RepeatHandler`), else each copy is `handler`'s."""

    def factory() -> HttpProtocol:
        return HttpProtocol(handler, tracker, error_page, server, repeats)

    return factory
