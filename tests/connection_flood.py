"""Hold many idle connections (or half-requests) open against a server, as its own process.

`python -m tests.connection_flood PORT FIRST COUNT [HEAD]`: opens COUNT TCP connections to
127.0.0.1:PORT from the loopback addresses 127.0.FIRST/250.FIRST%250+2 onwards (one of
`ADDRESSES` per connection, round robin: pods of a node, not one client), writes HEAD (a
request cut short; none: idle) on each once connected, prints one JSON line
`{"opened": n, "written": m, "seconds": s}`, then holds every socket until stdin closes.

Its own process because RLIMIT_NOFILE's hard limit (20,000 here, and without CAP_SYS_RESOURCE
it cannot be raised) bounds one process's descriptors: two of these hold 20,000 connections
beside a test process that needs its own.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sys
import time

ADDRESSES = 40
SETTLE_SECONDS = 8.0  # a connection not established by then is counted as not opened


def source(first: int, index: int) -> str:
    n = first + index % ADDRESSES
    return f"127.0.{n // 250}.{n % 250 + 2}"


def main() -> None:
    port, first, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    head = sys.argv[4].encode("latin-1") if len(sys.argv) > 4 else b""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    held: list[socket.socket] = []
    pending = selectors.DefaultSelector()
    for index in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source(first, index), 0))
        sock.connect_ex(("127.0.0.1", port))
        held.append(sock)
        pending.register(sock, selectors.EVENT_WRITE)
    opened = written = 0
    deadline = started + SETTLE_SECONDS
    while pending.get_map() and time.monotonic() < deadline:
        for key, _ in pending.select(timeout=0.1):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            pending.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                continue
            opened += 1
            if head:
                try:
                    sock.send(head)
                except OSError:  # refused at once (past the cap): closed by the server
                    continue
                written += 1
    seconds = round(time.monotonic() - started, 2)
    print(json.dumps({"opened": opened, "written": written, "seconds": seconds}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
