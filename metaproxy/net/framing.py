"""Where each HTTP/1.1 request head begins and ends on a connection, from the bytes alone.

The connection guard gives every request head a deadline. Finding the end of the first head is
not enough: a kept-alive connection carries more requests, and a client that sends a complete
request and then half of a second one held its socket for the 60 s keep-alive instead of the
5 s head deadline; one that sent `\\r\\n\\r\\n` first ended the deadline before any request.
So this follows the message framing — head, then a Content-Length or chunked body, then the next
head — and says at every moment whether the client owes us the rest of a head.

It is not a parser: the server's own parser still decides what is valid and answers 400. Framing
it cannot follow (conflicting or malformed lengths) leaves it inside a head for good, so the
deadline closes the connection unless the server's parser does first.
"""

from __future__ import annotations

import re

# Beyond this a head is not one our clients send (a few KB; Kubernetes tokens included): the
# state is then lost, and the deadline closes the connection unless the server refuses it first.
MAX_HEAD_BYTES = 64 << 10
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Lines end in CRLF: `$` (multiline) stops before the `\n` only, so the `\r` is matched here.
# Without it every Content-Length but the head's last header went unread, the framing was
# lost, and a request the broker took longer than the header deadline to answer got a 408.
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r?$", re.I | re.M)
_ANY_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:", re.I | re.M)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:(.*)$", re.I | re.M)
_CHUNK_SIZE = re.compile(rb"^[ \t]*([0-9a-fA-F]{1,15})[ \t]*(?:;.*)?$")

_IDLE, _HEAD, _BODY, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _LOST = range(8)


class RequestFraming:
    """Fed every byte a client sends, in order; `in_head` is True while a head has begun and is
    not complete (from the first byte, leading empty lines included)."""

    def __init__(self, *, started: bool = True) -> None:
        # A new connection owes its first head from the moment it is accepted.
        self._state = _HEAD if started else _IDLE
        self._head_bytes = bytearray()  # the head so far (appended to in place: heads trickle)
        self._buffer = b""  # a chunk-size or trailer line so far
        self._left = 0  # body or chunk bytes still to come

    @property
    def in_head(self) -> bool:
        return self._state in (_HEAD, _LOST)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._state != _LOST:
            view = self._step(view)

    def _step(self, view: memoryview) -> memoryview:
        state = self._state
        if state in (_BODY, _CHUNK_DATA):
            taken = min(self._left, len(view))
            self._left -= taken
            if not self._left:
                self._state = _IDLE if state == _BODY else _CHUNK_END
            return view[taken:]
        if state == _IDLE:
            self._state = _HEAD
            return view
        return self._line_state(view)

    def _line_state(self, view: memoryview) -> memoryview:
        """HEAD, CHUNK_LINE, CHUNK_END and TRAILERS: states that read up to a line ending."""
        if self._state == _HEAD:
            return self._head(view)
        newline = bytes(view).find(b"\n")
        if newline < 0:
            self._buffer += bytes(view)
            if len(self._buffer) > MAX_HEAD_BYTES:  # a chunk line has no business being long
                self._state = _LOST
            return view[len(view) :]
        line = (self._buffer + bytes(view[:newline])).rstrip(b"\r")
        self._buffer = b""
        rest = view[newline + 1 :]
        if self._state == _CHUNK_END:
            self._state = _CHUNK_LINE if not line else _LOST
        elif self._state == _TRAILERS:
            self._state = _IDLE if not line else _TRAILERS
        else:
            size = _CHUNK_SIZE.match(line)
            if size is None:
                self._state = _LOST
            elif (left := int(size.group(1), 16)) == 0:
                self._state = _TRAILERS
            else:
                self._left, self._state = left, _CHUNK_DATA
        return rest

    def _head(self, view: memoryview) -> memoryview:
        data = bytes(view)
        offset = 0
        if not self._head_bytes:
            # Empty lines before a request line are allowed (RFC 9112 2.2): not a head yet, but
            # the deadline runs, so a client cannot hold a socket by sending only them.
            offset = len(data) - len(data.lstrip(b"\r\n"))
        start = len(self._head_bytes)
        self._head_bytes += data[offset:]
        # A `\r\n\r\n` split across reads starts at most 3 bytes back.
        end = _HEAD_END.search(self._head_bytes, max(0, start - 3))
        if end is None:
            if len(self._head_bytes) > MAX_HEAD_BYTES:
                self._state = _LOST
            return view[len(view) :]
        head = bytes(self._head_bytes[: end.start()])
        self._head_bytes = bytearray()
        self._body(head)
        return view[offset + end.end() - start :]

    def _body(self, head: bytes) -> None:
        encodings = _TRANSFER_ENCODING.findall(head)
        lengths = _CONTENT_LENGTH.findall(head)
        if encodings:
            codings = b",".join(encodings).split(b",")
            chunked = codings[-1].strip().lower() == b"chunked"
            self._state = _CHUNK_LINE if chunked and not lengths else _LOST
        elif len(lengths) != len(_ANY_CONTENT_LENGTH.findall(head)) or len(set(lengths)) > 1:
            self._state = _LOST
        elif lengths and int(lengths[0]):
            self._left, self._state = int(lengths[0]), _BODY
        else:
            self._state = _IDLE
