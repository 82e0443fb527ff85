"""What the sidecar's HTTP/1.1 server (`http1`) hands a handler and takes back: `Request`,
`Response`, the limits it enforces, and the Date header's format.

A `Response` keeps its own encoding: answers from the credential cache are the same object every
time, so their status line and headers are encoded once, and their whole kept-alive bytes once
a second (Date changes).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Payload Too Large", 414: "URI Too Long", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable",
}  # fmt: skip
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """RFC 9110's IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), without `email.utils`: that
    package is a few megabytes of every pod's memory for one header."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    remote: str
    duplicate_headers: frozenset[str] = frozenset()
    connection: int = 0  # which connection of the tracker: fairness is between connections
    # Header lines the answer to this request carries besides the response's own, set by the
    # handler: IMDS sends the token's remaining TTL on every answer to a request that has one.
    extra_head: bytes = b""
    # The handler's own note on this request, which lives as long as it: `http1` hands the same
    # Request to the repeat handler for every repeat of it on a connection, so a handler may
    # keep there what the answer was made from, and check that instead of making it again.
    kept: tuple[Any, ...] | None = None
    # The data plane's verdict on its headers (DNS rebinding, `rebinding.HostCheck`), once
    # judged: they do not change, so a repeated request is judged once (None: not yet).
    host_refused: bool | None = None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""  # the status line's words, when not the usual ones (EC2's "Not Allowed")
    # The status line and this response's own headers, encoded on its first write: answers
    # from the credential cache are the same object every time, so they are encoded once.
    # (Date and Server, the connection's, go after them, as EC2 orders its headers.)
    head: tuple[bytes, bytes] | None = field(default=None, compare=False, repr=False)
    # The whole kept-alive answer, for the Date/Server lines and the request's extra lines it
    # was built with (they change once a second): a cached answer is then one write of bytes
    # already made.
    wire: tuple[bytes, bytes, bytes] | None = field(default=None, compare=False, repr=False)

    def encoded_head(self) -> tuple[bytes, bytes]:
        """(status line, the content type, this response's own headers and the length)."""
        if self.head is None:
            lines = [f"Content-Type: {self.content_type}\r\n"]
            lines += [f"{name}: {value}\r\n" for name, value in self.headers]
            lines.append(f"Content-Length: {len(self.body)}\r\n")
            reason = self.reason or REASONS.get(self.status, "")
            status = f"HTTP/1.1 {self.status} {reason}\r\n"
            self.head = (status.encode("latin-1"), "".join(lines).encode("latin-1"))
        return self.head

    def keep_alive_bytes(self, date_and_server: bytes, extra: bytes = b"") -> bytes:
        """The whole answer on a kept-alive connection: status, `extra` (the request's own
        lines), this response's headers, Date and Server, body."""
        wire = self.wire
        if wire is not None and wire[0] is date_and_server and wire[1] == extra:
            return wire[2]
        status, fields = self.encoded_head()
        data = b"".join((status, extra, fields, date_and_server, b"\r\n", self.body))
        self.wire = (date_and_server, extra, data)
        return data


Handler = Callable[[Request], "Response | Awaitable[Response]"]
# `count` copies of one request that arrived together (`http1`'s pipelined repeats), answered
# as one: the answer each of them gets, or None to have them handled one by one instead.
RepeatHandler = Callable[[Request, int], "Response | Awaitable[Response] | None"]
ErrorPage = Callable[[int], Response]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout: float = 5.0
    keepalive_timeout: float = 15.0
    max_url_bytes: int = 4096
    max_header_bytes: int = 8190
    max_headers: int = 64
    max_body_bytes: int = 1024
