"""A real HTTP proxy in front of the STS emulator that injects STS faults.

Tests, the demo and the benchmarks inject latency, throttling, errors and outages here rather
than by mocking our own code, so the broker meets them exactly as it would meet AWS: through
botocore parsing real HTTP answers. Faults (`faults.py`) change at run time through
`FaultProxy.set()` or the admin API (`faultadmin.py`), which listens on its own port so that it
stays reachable while the proxy's port refuses connections (`mode="refuse"`, `refusable.py`).
What the proxy received, and who signed it, is kept in a `Recording` (`recording.py`).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import asdict, replace

import aiohttp
from aiohttp import web
from yarl import URL

from metaproxy.clock import Clock, SystemClock
from metaproxy.testing.faultadmin import admin_app, is_admin_path
from metaproxy.testing.faults import Faults, Mode, sts_error, validate_faults
from metaproxy.testing.recording import RecordedCall, RecordedRequest, Recording
from metaproxy.testing.refusable import RefusablePort

# STS requests are small forms, read whole to find the action; bigger bodies (S3 uploads) and
# bodies of unknown length are streamed through unread.
MAX_ACTION_SNIFF_BYTES = 64 * 1024

# RFC 9110 §7.6.1 connection-specific headers, plus those aiohttp recomputes for the new hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


class FaultProxy:
    """Forwards every request to `upstream`, injecting the faults set with `set()`."""

    def __init__(
        self,
        upstream: str,
        *,
        port: int = 0,
        admin_port: int = 0,
        seed: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._upstream = upstream.rstrip("/")
        self._requested_port = port
        self._requested_admin_port = admin_port
        self._random = random.Random(seed)  # noqa: S311 - fault sampling, not security
        self._clock: Clock = clock or SystemClock()
        self._faults = Faults()
        self._mode_changed = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._listener: RefusablePort | None = None
        self._port: int | None = None
        self._admin_port: int | None = None
        self._seen = Recording()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("fault proxy is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def admin_url(self) -> str:
        if self._admin_port is None:
            raise RuntimeError("fault proxy is not running")
        return f"http://127.0.0.1:{self._admin_port}"

    async def start(self) -> str:
        """Listen on 127.0.0.1 (proxy and admin ports) and return the proxy's URL."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._session = aiohttp.ClientSession(
            auto_decompress=False,  # bytes pass through untouched, Content-Encoding and all
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        proxy_app = web.Application()
        proxy_app.router.add_route("*", "/{tail:.*}", self._proxy)
        # Cancelling the handler when the client goes away releases blackholed requests and
        # aborts the upstream call, as a real proxy would.
        self._runner = web.AppRunner(
            proxy_app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self._listener = RefusablePort(self._runner.server, self._requested_port)
        self._port = await self._listener.listen()
        if self._faults.mode == "refuse":
            self._listener.refuse()  # the port is known now; connections to it are refused

        self._admin_runner = web.AppRunner(admin_app(self), handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, "127.0.0.1", self._requested_admin_port)
        await admin_site.start()
        self._admin_port = self._admin_runner.addresses[0][1]
        return self.url

    async def aclose(self) -> None:
        """Stop both listeners, drop held requests and close the upstream session."""
        self._stopping = True
        self._wake_held_requests()
        if self._listener is not None:
            self._listener.refuse()
        for runner in (self._runner, self._admin_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._admin_runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._port = self._admin_port = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- faults ----------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set(self, **faults: object) -> None:
        """Change faults (latency, jitter, throttle_fraction, error_fraction, mode, refuse_code).

        Raises ValueError for an unknown key or an out-of-range value; nothing changes then.
        May be called from any thread.
        """
        checked = validate_faults(faults)
        previous = self._faults
        self._faults = replace(previous, **checked)
        if self._faults.mode != previous.mode:
            self._on_mode_change(previous.mode)

    def _on_mode_change(self, previous: Mode) -> None:
        if self._loop is None or self._loop.is_closed():
            return  # not started: start() applies the mode
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._apply_mode(previous)
        else:
            self._loop.call_soon_threadsafe(self._apply_mode, previous)

    def _apply_mode(self, previous: Mode) -> None:
        listener = self._listener
        if listener is not None and self._faults.mode == "refuse":
            listener.refuse()
        elif listener is not None and previous == "refuse" and not self._stopping:
            listener.listen_again()
        self._wake_held_requests()

    def _wake_held_requests(self) -> None:
        held, self._mode_changed = self._mode_changed, asyncio.Event()
        held.set()

    # -- what it received ------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters and the AssumeRole timeline (faults stay as they are)."""
        self._seen.reset()

    def assume_role_calls(self) -> list[RecordedCall]:
        """Every AssumeRole call received, in order, with its parameters and signing key."""
        return list(self._seen.assume_role_calls)

    def recorded_requests(self) -> list[RecordedRequest]:
        """The latest requests received (admin calls aside), oldest first, with their signers."""
        return list(self._seen.requests)

    def assume_role_timeline(self) -> list[float]:
        """Monotonic arrival times of every AssumeRole call received."""
        return list(self._seen.assume_role_times)

    def max_rate(self, window: float = 1.0) -> float:
        """The highest AssumeRole rate (calls per second) over any `window`-second interval."""
        return self._seen.max_rate(window)

    def stats(self) -> dict[str, object]:
        return {**self._seen.counters(), "faults": asdict(self._faults)}

    # -- the proxy -------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if is_admin_path(request.path):
            # Admin calls go to admin_url; forwarding them would hand them to the upstream.
            return web.json_response({"error": "not found"}, status=404)
        length = request.content_length
        small = length is not None and length <= MAX_ACTION_SNIFF_BYTES
        body = await request.read() if small else None
        seen = self._seen
        is_assume_role = seen.received(request, body, self._clock.monotonic())

        if self._faults.mode == "blackhole":
            seen.requests_held += 1
        while self._faults.mode == "blackhole" and not self._stopping:
            await self._mode_changed.wait()
        if self._faults.mode in ("reset", "refuse") or self._stopping:
            # On a connection accepted before `refuse`, dropping it is the closest equivalent.
            seen.requests_reset += 1
            _reset_connection(request)
            return web.Response(status=500)  # never sent: the transport is already gone

        faults = self._faults
        delay = faults.latency + self._random.uniform(0.0, faults.jitter)
        if delay > 0:
            await asyncio.sleep(delay)

        if is_assume_role:
            if self._random.random() < faults.throttle_fraction:
                seen.assume_role_throttled += 1
                return sts_error(400, "Sender", "Throttling", "Rate exceeded")
            if self._random.random() < faults.error_fraction:
                seen.assume_role_failed += 1
                return sts_error(500, "Receiver", "InternalFailure", "Internal failure")
            if faults.refuse_code:
                seen.assume_role_failed += 1
                return sts_error(400, "Sender", faults.refuse_code, "Refused by the fault proxy")
            seen.assume_role_forwarded += 1
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes | None) -> web.StreamResponse:
        """Send the request upstream (`body`, or else the unread stream) and stream the answer."""
        assert self._session is not None
        # A body already read goes as bytes and aiohttp sets its length; a streamed one keeps
        # the client's Content-Length so that it is not re-framed as chunked.
        skipped = HOP_BY_HOP | {"content-length"} if body is not None else HOP_BY_HOP
        headers = {
            name: value for name, value in request.headers.items() if name.lower() not in skipped
        }
        data = body if body is not None else request.content if request.body_exists else None
        target = URL(self._upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method,
                target,
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError):
            return web.json_response({"error": "upstream unavailable"}, status=502)


def _reset_connection(request: web.Request) -> None:
    """Close the client's connection with a TCP RST and no HTTP response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close() into a RST, which is what a crashed or reset endpoint sends.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
