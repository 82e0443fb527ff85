"""Connection-level defences shared by the sidecar and the broker, applied before aiohttp sees a
byte: a cap on open connections (in total and per client address), a deadline for the request
line and headers, and a file-descriptor budget derived from RLIMIT_NOFILE.

A shared metadata service was taken down by workloads that leaked connections in a tight loop
until the host ran out of file descriptors. Here every accepted socket is counted; past the cap
it gets a canned 429 and is closed at once, without a parser, a task or a request object. A
client that opens a socket and trickles headers (slowloris) is cut at the header deadline —
aiohttp has none of its own; its keep-alive timer only reaps connections that are idle.

Usage: `guard.protocol_factory(server, reject)` wraps any protocol factory (the sidecar's
`http1`, aiohttp's `web.Server`); the connection is then decided on when the loop hands it over.
A TLS listener cannot wait that long — the loop hands it over only after the handshake, and a
socket stalled there would count nowhere — so `metaproxy.net.listener` runs its own accept loop and
has the guard decide on the raw socket (`GuardedProtocol.accepted`). This module imports no web
framework: the sidecar uses it without aiohttp. The aiohttp side — `GuardedTCPSite`/
`GuardedUnixSite`, `body_deadline`, `ProtocolLog`, `refuse_unknown_expectations` — is
`metaproxy.net.webguard`, and is also importable from here (loaded on first use) for the broker and
the webhook.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

from metaproxy.net.framing import RequestFraming

# asyncio's loop accepts up to `backlog` sockets per wake-up before any refused one is closed, so
# a backlog of 1024 would let a connection storm hold 1024 descriptors for a moment whatever the
# cap. Guarded listeners accept at most this many per wake-up (`metaproxy.net.listener`); the
# kernel's accept queue keeps the full backlog, so that a burst of connections waits there,
# holding no descriptor of ours, instead of being dropped at the handshake.
ACCEPT_BACKLOG = 64
# File descriptors kept back for everything that is not an admitted connection: listening
# sockets, the event loop, log and audit files, the upstream connection pool, and sockets
# accepted only to be refused (two accept batches). The connection cap never eats into these.
FD_RESERVE = 64 + 2 * ACCEPT_BACKLOG
# Refused sockets kept a moment to read the head of what may be a health probe, or (on a TLS
# listener) to say why inside TLS: at most this many at once, inside FD_RESERVE's allowance for
# refused sockets; past it one is refused at once.
COURTESY_MAX = ACCEPT_BACKLOG // 2
PROBE_HEAD_MAX = 4096  # a kubelet probe's head is a few hundred bytes
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)

RejectResponse = Callable[[], bytes]
# A health probe's answer (a complete HTTP response) for a request target, or None if the target
# is not a probe. Probes are answered even past the caps: a kubelet must never see a 429 because
# other admin clients hold the connections, or it restarts a healthy process.
ProbeAnswer = Callable[[bytes], bytes | None]

log = logging.getLogger("metaproxy.net.connguard")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    max_per_client: int


def soft_fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_budget(cap: int, reserve: int = FD_RESERVE, soft_limit: int | None = None) -> int:
    """Descriptors a process holding `cap` connections stays under, `reserve` included."""
    soft = soft_fd_limit() if soft_limit is None else soft_limit
    return min(soft, cap + reserve)


def canned_response(
    status: int, reason: str, body: bytes, content_type: str, retry_after: int = 1
) -> bytes:
    """A complete HTTP/1.1 answer written straight to the socket, then the socket is closed."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


@runtime_checkable
class Evictable(Protocol):
    """A server protocol that can say since when it has owed its client nothing (`None` while
    it owes an answer): the connection idle the longest is closed to make room before a new one
    is refused. Protocols without this attribute are never closed early for being idle."""

    @property
    def idle_since(self) -> float | None: ...


@runtime_checkable
class KeepsHeadDeadlines(Protocol):
    """A server protocol that gives every request head after the first its own deadline (the
    sidecar's `http1`, which also parses). The guard then times only the first head and does
    not follow the framing of every request: that duplicate bookkeeping was a fifth of the
    sidecar's time per cached-credential answer."""

    @property
    def awaiting_first_head(self) -> bool: ...


class ConnectionGuard:
    """Counts the connections of one or more listeners and admits or refuses each new one.

    `limits` is called per connection, so limits delivered later (the sidecar learns its tenant's
    limits with its first credentials) apply to the next connection. The effective cap is never
    above `soft RLIMIT_NOFILE - fd_reserve`.
    """

    def __init__(
        self,
        name: str,
        limits: Callable[[], ConnectionLimits],
        *,
        header_timeout: float,
        fd_reserve: int = FD_RESERVE,
        fd_soft_limit: int | None = None,
        on_refused: Callable[[str], None] = lambda _reason: None,
        probes: ProbeAnswer | None = None,
    ) -> None:
        self.name = name
        self.probes = probes
        self._limits = limits
        # Told every refusal: "total", "per_client", "evicted" or "header_timeout" (metrics).
        self.on_refused = on_refused
        self.header_timeout = header_timeout
        self.fd_reserve = fd_reserve
        soft = soft_fd_limit() if fd_soft_limit is None else fd_soft_limit
        self.fd_soft_limit = soft
        self.fd_connection_limit = max(1, soft - fd_reserve)
        self._by_client: dict[str, dict[GuardedProtocol, None]] = {}
        self.open = 0
        self.peak = 0
        self.rejected: dict[str, int] = {"total": 0, "per_client": 0}
        self.evicted = 0
        self.header_timeouts = 0
        self.courtesy = 0  # refused sockets held to say why (COURTESY_MAX)
        self.probes_answered = 0

    @property
    def cap(self) -> int:
        return min(self._limits().max_connections, self.fd_connection_limit)

    @property
    def fd_budget(self) -> int:
        """What this listener may hold, reserve included: the process stays under this."""
        return fd_budget(self.cap, self.fd_reserve, self.fd_soft_limit)

    def by_client(self) -> dict[str, int]:
        return {client: len(conns) for client, conns in self._by_client.items()}

    def protocol_factory(
        self, server: Callable[[], asyncio.Protocol], reject: RejectResponse
    ) -> Callable[[], asyncio.Protocol]:
        def factory() -> asyncio.Protocol:
            return GuardedProtocol(self, server, reject)

        return factory

    def _admit(self, conn: GuardedProtocol) -> str | None:
        """None if admitted, else why not ("total" or "per_client")."""
        limits = self._limits()
        mine = self._by_client.get(conn.client)
        count = len(mine) if mine else 0
        if count >= max(1, limits.max_per_client):
            # Every container of a pod shares one address: the pod's leaked connections must
            # not lock out its other containers. An idle one makes room before anyone is refused.
            if not mine or not self._evict_idle(mine):
                return "per_client"
            count -= 1
        if self.open >= self.cap and not self._evict_for(count):
            return "total"
        self._by_client.setdefault(conn.client, {})[conn] = None
        self.open += 1
        self.peak = max(self.peak, self.open)
        return None

    def _evict_for(self, count: int) -> bool:
        """At the cap, a light client takes the oldest connection of the heaviest one, so many
        leaked connections from one address cannot lock out a well-behaved neighbour."""
        heaviest = max(self._by_client.values(), key=len, default=None)
        if heaviest is None or len(heaviest) <= count + 1:
            return False
        if self._evict_idle(heaviest):
            return True
        victim = next(iter(heaviest))
        self._release(victim)
        victim.evict()
        self.evicted += 1
        self.on_refused("evicted")
        return True

    def _evict_idle(self, conns: dict[GuardedProtocol, None]) -> bool:
        """Close the one of `conns` idle the longest (see `Evictable`); False if none is idle."""
        victim, since = None, float("inf")
        for conn in conns:
            idle = conn.idle_since
            if idle is not None and idle < since:
                victim, since = conn, idle
        if victim is None:
            return False
        self._release(victim)
        victim.evict()
        self.evicted += 1
        self.on_refused("evicted")
        return True

    def _release(self, conn: GuardedProtocol) -> None:
        conns = self._by_client.get(conn.client)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        if not conns:
            del self._by_client[conn.client]
        self.open -= 1


class GuardedProtocol(asyncio.Protocol):
    """Stands between the transport and the server's protocol, which is only built once the
    connection is admitted."""

    def __init__(
        self,
        guard: ConnectionGuard,
        server: Callable[[], asyncio.Protocol],
        reject: RejectResponse,
    ) -> None:
        self._guard = guard
        self._server = server
        self._reject = reject
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        # Made with the server protocol, unless it keeps its own head deadlines
        # (KeepsHeadDeadlines); only an admitted connection's requests are followed.
        self._framing: RequestFraming | None = None
        self._refused = False
        self._courtesy = False  # holding one of the guard's COURTESY_MAX slots
        self._probe_head: bytearray | None = None  # refused: reading what may be a probe
        self._decided = False
        # Set by the listener while the loop does the TLS handshake (no transport yet): eviction
        # aborts the handshake with it, so the slot and the descriptor go together.
        self.abort_handshake: Callable[[], object] | None = None
        self.client = ""

    def accepted(self, client: str, *, handshake: bool) -> bool:
        """Admit or refuse a socket just accepted from `client`, before any byte is read or any
        handshake made: from here on it counts. False when the socket is to be closed at once.

        A refused socket behind a `handshake` (TLS) can only be told why once the handshake is
        done, so it is kept only within the guard's COURTESY_MAX allowance, like probes."""
        self.client = client
        self._decided = True
        guard = self._guard
        refused = guard._admit(self)
        if refused is None:
            return True
        guard.rejected[refused] += 1
        guard.on_refused(refused)
        self._refused = True
        if (guard.probes is None and not handshake) or guard.courtesy >= COURTESY_MAX:
            return False
        guard.courtesy += 1
        self._courtesy = True
        if guard.probes is not None:
            self._probe_head = bytearray()
        return True

    def handshake_failed(self) -> None:
        """The loop gave up on the socket before `connection_made` (TLS handshake failed, timed
        out or was aborted): it stops counting."""
        self.abort_handshake = None
        self._closed()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        raw = self._transport = cast(asyncio.Transport, transport)
        self.abort_handshake = None
        if not self._decided:
            peer: Any = raw.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not self.accepted(client, handshake=False):
                raw.write(self._reject())
                raw.close()
                return
        if self._refused and self._probe_head is None:
            raw.write(self._reject())  # past the cap, kept only to say so inside TLS
            raw.close()
            return
        self._arm()
        if not self._refused:
            self._inner = self._server()
            if not isinstance(self._inner, KeepsHeadDeadlines):
                self._framing = RequestFraming()
            self._inner.connection_made(raw)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            if self._probe_head is not None:
                self._read_probe(data)
            return  # refused: whatever else the client sends is dropped
        framing = self._framing
        if framing is not None:
            framing.feed(data)
            # Every head on the connection has the deadline, not only the first (framing.py).
            if framing.in_head:
                if self._deadline is None:
                    self._arm()
            elif self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        if self._inner is not None:
            self._inner.connection_lost(exc)
            self._inner = None

    def _closed(self) -> None:
        """The socket is gone (or going): it stops counting, whichever way it went."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._guard._release(self)
        if self._courtesy:
            self._courtesy = False
            self._guard.courtesy -= 1

    @property
    def idle_since(self) -> float | None:
        inner: object = self._inner  # any server protocol; only some can tell
        return inner.idle_since if isinstance(inner, Evictable) else None

    def evict(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        elif self.abort_handshake is not None:
            self.abort_handshake()

    def _arm(self) -> None:
        if self._guard.header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._guard.header_timeout, self._headers_too_slow)

    def _read_probe(self, data: bytes) -> None:
        """A refused connection's request: a health probe gets its answer, anything else the
        refusal, once the head is in (within the header deadline)."""
        head = self._probe_head
        assert head is not None and self._transport is not None
        head += data
        request = bytes(head).lstrip(b"\r\n")
        if b"\n\n" not in request.replace(b"\r\n", b"\n") and len(head) <= PROBE_HEAD_MAX:
            return
        self._probe_head = None
        method, _, rest = request.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        probes = self._guard.probes
        answer = probes(target) if probes is not None and method in (b"GET", b"HEAD") else None
        if answer is not None:
            self._guard.probes_answered += 1
        self._transport.write(answer if answer is not None else self._reject())
        self._transport.close()

    def _headers_too_slow(self) -> None:
        self._deadline = None
        inner: object = self._inner  # any server protocol; only some time their own heads
        if isinstance(inner, KeepsHeadDeadlines) and not inner.awaiting_first_head:
            return  # the first head came in time; the server times every later one itself
        self._guard.header_timeouts += 1
        self._guard.on_refused("header_timeout")
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(_TIMEOUT_RESPONSE)
        transport.close()
