"""The connections of the sidecar's HTTP/1.1 server (`http1`): one `ConnectionTracker` per
sidecar for its data-plane listeners (one more for admin), which

- enforces every connection's deadline (a request head, an announced body, a kept-alive idle
  spell) from one timer, instead of one timer per request on the hot path;
- keeps this second's Date and Server lines, which every answer carries;
- drains at shutdown: stop keeping connections alive, wait (capped) for answers in flight.

Admission (caps, eviction, the descriptor budget) is not here: that is `metaproxy.net.connguard`,
in front of every listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from metaproxy.sidecar.wire.messages import ServerLimits, http_date

SWEEP_SECONDS = 0.25  # how late a deadline may be enforced
# Open at once, at least: a burst, after which `after_burst` is called (the sidecar trims its
# heap then, `heap.trim_free_heap`). A connection leaves about 6 KB resident once closed, and the
# trim's own cost (0.3 MB resident) is paid back from about a hundred of them.
BURST_CONNECTIONS = 128


class Tracked(Protocol):
    """A connection as the tracker sees it (`http1.HttpProtocol`)."""

    deadline: float  # loop time by which it must have made progress (inf: none owed)

    @property
    def idle(self) -> bool:
        """No request is being read or answered."""

    def close(self) -> None: ...

    def time_out(self) -> None:
        """Past its deadline: refuse what is unfinished (408) or close it."""


@dataclass
class ConnectionTracker:
    """The connections of every data-plane listener of one sidecar, and their deadlines."""

    limits: ServerLimits
    on_reject: Callable[[str], None] = lambda _reason: None
    connections: set[Tracked] = field(default_factory=set)
    date_header: bytes = b""
    # Server name → its Date and Server lines, as written on every answer ("" → Date only: the
    # container endpoint, like ECS's, names no server). Remade once a second.
    date_lines: dict[str, bytes] = field(default_factory=dict)
    draining: bool = False  # set at shutdown: answer what is in flight, then close
    accepted: int = 0  # connections so far; each one's number identifies it
    last_answer: float = float("-inf")  # loop time of the last answer written on any connection
    paths: dict[bytes, str] = field(default_factory=dict)  # request target → decoded path
    # Called once the connections of a burst (BURST_CONNECTIONS or more open at once, seen by
    # the sweeper) are down to a quarter: the sidecar hands their freed memory back.
    after_burst: Callable[[], None] | None = None
    _peak: int = 0  # the most connections the sweeper saw open since the last burst ended
    _quiet: asyncio.Event | None = None
    _sweeper: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._refresh_date()

    def _refresh_date(self) -> None:
        date = http_date(time.time()).encode("ascii")
        if date == self.date_header:
            return  # same second: the kept answers (`Response.keep_alive_bytes`) stay valid
        self.date_header = date
        for server in self.date_lines:
            self.date_lines[server] = self._date_line(server)

    def _date_line(self, server: str) -> bytes:
        line = b"Date: %s\r\n" % self.date_header
        return line + b"Server: %s\r\n" % server.encode("latin-1") if server else line

    def date_line(self, server: str) -> bytes:
        """This second's Date (and Server) lines for `server`."""
        line = self.date_lines.get(server)
        if line is None:
            line = self.date_lines[server] = self._date_line(server)
        return line

    @property
    def busy(self) -> int:
        """Connections with a request being answered (what a drain waits for)."""
        return sum(1 for conn in self.connections if not conn.idle)

    async def drain(self, cap_seconds: float) -> None:
        """Stop keeping connections alive; wait (at most `cap_seconds`) for answers in flight."""
        self.draining = True
        self._quiet = asyncio.Event()
        self.close_idle()
        self.note_progress()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), cap_seconds)
        for conn in list(self.connections):
            conn.close()

    async def quiet(self, silence: float, deadline: float) -> None:
        """Wait until no connection owes an answer and none has been written for `silence`
        seconds, or until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            idle_for = loop.time() - self.last_answer
            if not self.busy and idle_for >= silence:
                return
            await asyncio.sleep(min(max(0.05, silence - idle_for), deadline - loop.time()))

    def note_progress(self) -> None:
        if self.draining and self._quiet is not None and not self.busy:
            self._quiet.set()

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def aclose(self) -> None:
        """Stop the deadlines and close every connection left: after a drain these are the
        ones it gave up on; without one (tests), all of them."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self.connections):
            conn.close()

    def close_idle(self) -> None:
        """At shutdown: close connections that have no request in progress."""
        for conn in list(self.connections):
            if conn.idle:
                conn.close()

    def _follow_bursts(self) -> None:
        count = len(self.connections)
        if count > self._peak:
            self._peak = count
        elif self._peak >= BURST_CONNECTIONS and count <= self._peak // 4:
            self._peak = count
            if self.after_burst is not None:
                self.after_burst()

    async def _sweep(self) -> None:
        # One timer for all connections instead of one per request: a deadline is a float
        # set on the hot path, and this loop enforces it within SWEEP_SECONDS.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._refresh_date()
            self._follow_bursts()
            now = loop.time()
            for conn in [c for c in self.connections if c.deadline < now]:
                conn.time_out()
