"""The limit of the sidecar's stack: uvloop, an `asyncio.Protocol`, httptools' request parser, and
nothing else. Every request on a listener gets the same prepared bytes, written once.

`bench/sidecar.py` captures the sidecar's whole answer to the benchmarked request (status line,
headers, body) and starts this server with it, pinned and loaded as the sidecar is: the sidecar's
rate over this one's is the share of the stack's limit the sidecar reaches. The parser is fed
every byte but keeps no URL or headers: reading them is the sidecar's cost. (The sidecar feeds
its parser a request once per connection and recognises its repeats by their bytes,
`http1._Repeat`; what that saves it is the parser's callbacks into Python, which this server
does not have: llhttp's own pass over a request is a small part of either's cost.)
Each answer is one `transport.write`, as the sidecar's is; uvloop sends it at once when nothing
is queued, so a pipelined batch costs both servers one send per answer.

The Date line is remade when the second changes, checked every quarter second, as
`metaproxy.sidecar.wire.http1` does; other lines (the token's remaining TTL, Last-Modified) are sent
as captured. Either way it happens once a second and costs nothing per request.

    python bench/stack_limit.py ANSWER_FILE [ANSWER_FILE ...]

listens on 127.0.0.1 (a kernel-chosen port per answer file), prints one JSON line
`{"urls": [...]}` in the files' order once listening, and serves until SIGTERM or SIGINT.
`capture` takes an answer from a running server; `start` runs this server on answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import socket
import subprocess
import sys
import typing
from email.utils import formatdate
from pathlib import Path

import httptools
import uvloop

DATE_EVERY = 0.25  # seconds between checks of the clock's second, as http1's sweeper
_DATE_LINE = re.compile(rb"\r\nDate: [^\r]*\r\n")


class Answer:
    """One listener's answer: the captured bytes with this second's Date."""

    __slots__ = ("_after", "_before", "_date", "data")

    def __init__(self, captured: bytes) -> None:
        head_end = captured.index(b"\r\n\r\n")
        match = _DATE_LINE.search(captured, 0, head_end + 2)
        if match is None:  # no Date line: sent as captured
            self._before, self._after = captured, b""
        else:
            self._before = captured[: match.start()] + b"\r\nDate: "
            self._after = b"\r\n" + captured[match.end() :]
        self._date = ""
        self.data = captured
        self.refresh()

    def refresh(self) -> None:
        if not self._after:
            return
        date = formatdate(usegmt=True)
        if date != self._date:
            self._date = date
            self.data = self._before + date.encode("ascii") + self._after


class AnswerProtocol(asyncio.Protocol):
    __slots__ = ("_answer", "_parser", "_transport")

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        del self._parser  # it holds our bound methods: a cycle (see http1.connection_lost)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(self._answer.data)
        if not self._parser.should_keep_alive():
            transport.close()


async def serve(files: list[Path]) -> None:
    loop = asyncio.get_running_loop()
    answers = [Answer(path.read_bytes()) for path in files]
    servers = []
    for answer in answers:
        factory = functools.partial(AnswerProtocol, answer)
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        servers.append(server)

    async def keep_dates() -> None:
        while True:
            await asyncio.sleep(DATE_EVERY)
            for answer in answers:
                answer.refresh()

    dates = loop.create_task(keep_dates())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    urls = [f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
    print(json.dumps({"urls": urls}), flush=True)
    await stop.wait()
    dates.cancel()
    for server in servers:
        server.close()


def capture(url: str, headers: dict[str, str]) -> bytes:
    """A server's whole answer (status line, headers, body) to one GET of `url` with `headers`,
    on a connection kept alive, asked as wrk asks it."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.rpartition(":")
    lines = [f"GET /{path} HTTP/1.1", f"Host: {hostport}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            data += _receive(conn)
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head + b"\r\n", re.I)
        if not head.startswith(b"HTTP/1.1 200 ") or length is None:
            raise RuntimeError(f"cannot capture {url}: {head!r}")
        while len(body) < int(length.group(1)):
            body += _receive(conn)
    return head + b"\r\n\r\n" + body


def _receive(conn: socket.socket) -> bytes:
    data = conn.recv(65536)
    if not data:
        raise RuntimeError("the server closed the connection before its whole answer")
    return data


def start(answers: dict[str, bytes], workdir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """This server in a process of its own, one listener per answer (written to `workdir`);
    the process and each answer's base URL, by the answers' keys. The caller pins and stops it."""
    files = []
    for name, answer in answers.items():
        files.append(workdir / f"{name}.answer")
        files[-1].write_bytes(answer)
    process = subprocess.Popen(
        [sys.executable, __file__, *map(str, files)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise RuntimeError(f"the stack limit exited with {process.returncode}")
    return process, dict(zip(answers, json.loads(line)["urls"], strict=True))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    uvloop.run(serve([Path(name) for name in sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
