"""A real HTTP proxy in front of the STS emulator that injects STS faults.

Tests, the demo and the benchmarks inject latency, throttling, errors and outages here rather
than by mocking our own code, so the broker meets them exactly as it would meet AWS: through
botocore parsing real HTTP answers. Faults change at run time through `FaultProxy.set()` or the
admin API, which listens on its own port so that it stays reachable while the proxy's listening
socket is closed (`mode="refuse"`).

Admin API (JSON): `GET|POST /_fault` (read / change faults), `GET /_fault/stats`,
`POST /_fault/reset` (zero the counters; faults stay as they are).

Each AssumeRole call is also recorded (`assume_role_calls()`): its parameters and the access key
id that signed it, so a test can check what the broker asked STS for, and as whom. So is every
request (`recorded_requests()`, the latest `MAX_RECORDED_REQUESTS`): method, path and signing key,
because moto checks no signature, so only the proxy can tell which credentials a client used.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import random
import re
import socket
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from yarl import URL

from metaproxy.clock import Clock, SystemClock

Mode = Literal["pass", "refuse", "blackhole", "reset"]
MODES: tuple[str, ...] = get_args(Mode)
MAX_DELAY_SECONDS = 3600.0
# STS requests are small forms, read whole to find the action; bigger bodies (S3 uploads) and
# bodies of unknown length are streamed through unread.
MAX_ACTION_SNIFF_BYTES = 64 * 1024
ADMIN_PREFIX = "/_fault"
_ERROR_CODE = re.compile(r"^[A-Za-z]{0,64}$")
_SIGNED_BY = re.compile(r"Credential=([A-Za-z0-9]+)/")
_SIGNED_V2 = re.compile(r"AWS ([A-Za-z0-9]+):")
# Enough for any test's clients; bounded because benchmarks send millions of requests through.
MAX_RECORDED_REQUESTS = 10_000

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

STS_ERROR_XML = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
    "<Error><Type>{type}</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>{request_id}</RequestId></ErrorResponse>"
)


@dataclass(frozen=True)
class Faults:
    """The faults in force. Throttling and errors apply to `AssumeRole` calls only."""

    latency: float = 0.0
    jitter: float = 0.0
    # Drawn independently: error_fraction applies to the calls that were not throttled.
    throttle_fraction: float = 0.0
    error_fraction: float = 0.0
    mode: Mode = "pass"
    # Answer every AssumeRole with this STS error code (400, Sender) instead of forwarding it,
    # e.g. PackedPolicyTooLarge; empty: forward.
    refuse_code: str = ""


@dataclass(frozen=True)
class RecordedCall:
    """One AssumeRole as the proxy received it. No secret: the signature and the session token
    stay out; `access_key_id` is the key that signed the call (a chain's second hop is signed
    with the first hop's)."""

    params: dict[str, str]  # the form, e.g. RoleArn, ExternalId, Tags.member.1.Key
    access_key_id: str
    at: float  # monotonic

    def tags(self) -> dict[str, str]:
        """Tags.member.N.Key/Value as a dict."""
        found: dict[str, str] = {}
        for name, key in self.params.items():
            if name.startswith("Tags.member.") and name.endswith(".Key"):
                found[key] = self.params.get(name[: -len("Key")] + "Value", "")
        return found

    def transitive_tag_keys(self) -> list[str]:
        return [
            value
            for name, value in sorted(self.params.items())
            if name.startswith("TransitiveTagKeys.member.")
        ]


@dataclass(frozen=True)
class RecordedRequest:
    """Any request as the proxy received it, and the access key id that signed it (empty when
    unsigned). Nothing secret: no signature, no session token."""

    method: str
    path: str
    access_key_id: str
    at: float  # monotonic


def signing_key(request: web.Request) -> str:
    """The access key id that signed `request` (SigV4 or S3's SigV2, in the Authorization header
    or the query of a presigned URL), or ""."""
    authorization = request.headers.get("Authorization", "")
    if signed_by := _SIGNED_BY.search(authorization) or _SIGNED_V2.match(authorization):
        return signed_by.group(1)
    query = request.query
    return query.get("X-Amz-Credential", "").partition("/")[0] or query.get("AWSAccessKeyId", "")


def _number(key: str, value: object, upper: float) -> float:
    # bool is an int subclass; `{"latency": true}` is a client bug, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not 0.0 <= value <= upper:
        raise ValueError(f"{key} must be between 0 and {upper:g}")
    return float(value)


def validate_faults(changes: Mapping[str, object]) -> dict[str, Any]:
    """Checked, normalised fault changes; ValueError names the first bad key or value."""
    limits = {
        "latency": MAX_DELAY_SECONDS,
        "jitter": MAX_DELAY_SECONDS,
        "throttle_fraction": 1.0,
        "error_fraction": 1.0,
    }
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}")
            checked[key] = value
        elif key == "refuse_code":
            if not isinstance(value, str) or not _ERROR_CODE.match(value):
                raise ValueError("refuse_code must be an STS error code (letters) or empty")
            checked[key] = value
        elif key in limits:
            checked[key] = _number(key, value, limits[key])
        else:
            known = ", ".join(("mode", "refuse_code", *limits))
            raise ValueError(f"unknown fault {key!r}; known: {known}")
    return checked


def max_calls_in_window(timestamps: Sequence[float], window: float = 1.0) -> int:
    """The most timestamps in any half-open interval `[t, t + window)`."""
    ordered = sorted(timestamps)
    best = 0
    for start_index, start in enumerate(ordered):
        end_index = bisect.bisect_left(ordered, start + window, lo=start_index)
        best = max(best, end_index - start_index)
    return best


def sts_action(request: web.Request, body: bytes | None) -> str | None:
    """The STS action of a query-protocol call: from the query string or the form body."""
    if action := request.query.get("Action"):
        return action
    if not body:
        return None
    if "x-www-form-urlencoded" not in request.headers.get("Content-Type", ""):
        return None
    values = parse_qs(body.decode("utf-8", "replace")).get("Action")
    return values[0] if values else None


def _recorded(request: web.Request, body: bytes | None, at: float) -> RecordedCall:
    form = parse_qs(body.decode("utf-8", "replace")) if body else {}
    params = {name: values[0] for name, values in form.items()}
    params.update(dict(request.query.items()))
    return RecordedCall(params, signing_key(request), at)


def sts_error(status: int, error_type: str, code: str, message: str) -> web.Response:
    body = STS_ERROR_XML.format(
        type=error_type, code=code, message=message, request_id=uuid.uuid4()
    )
    return web.Response(status=status, text=body, content_type="text/xml")


def _is_admin_path(path: str) -> bool:
    # `//_fault` and `/%5Ffault` reach the same place on some upstreams; refuse them all.
    stripped = "/" + path.lstrip("/")
    return stripped == ADMIN_PREFIX or stripped.startswith(ADMIN_PREFIX + "/")


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
        self._listener: asyncio.Server | None = None
        # Bound for a return from `refuse` but not yet handed to the event loop.
        self._pending_socket: socket.socket | None = None
        self._port: int | None = None
        self._admin_port: int | None = None
        self.reset_counters()

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
        self._port = self._requested_port
        self._listener = await self._listen()
        if self._faults.mode == "refuse":
            self._close_listeners()  # the port is known now; connections to it are refused

        admin_app = web.Application(client_max_size=64 * 1024)
        admin_app.router.add_get(ADMIN_PREFIX, self._admin_get_faults)
        admin_app.router.add_post(ADMIN_PREFIX, self._admin_set_faults)
        admin_app.router.add_get(ADMIN_PREFIX + "/stats", self._admin_stats)
        admin_app.router.add_post(ADMIN_PREFIX + "/reset", self._admin_reset)
        self._admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, "127.0.0.1", self._requested_admin_port)
        await admin_site.start()
        self._admin_port = self._admin_runner.addresses[0][1]
        return self.url

    async def aclose(self) -> None:
        """Stop both listeners, drop held requests and close the upstream session."""
        self._stopping = True
        self._wake_held_requests()
        self._close_listeners()
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

    async def _listen(self) -> asyncio.Server:
        assert self._runner is not None and self._runner.server is not None
        assert self._loop is not None
        server = await self._loop.create_server(
            self._runner.server, sock=self._bind_listening_socket()
        )
        return server

    def _bind_listening_socket(self) -> socket.socket:
        # Bound and listening before the event loop accepts on it: a client that connects right
        # after `set(mode="pass")` waits in the backlog instead of being refused.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._port or 0))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    # -- faults ----------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set(self, **faults: object) -> None:
        """Change faults (latency, jitter, throttle_fraction, error_fraction, mode).

        Raises ValueError for an unknown key or an out-of-range value; nothing changes then.
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
        mode = self._faults.mode
        if mode == "refuse":
            self._close_listeners()
        elif previous == "refuse" and self._port is not None and not self._stopping:
            assert self._loop is not None
            self._pending_socket = sock = self._bind_listening_socket()
            task = self._loop.create_task(self._serve_on(sock))
            task.add_done_callback(_log_task_failure)
        self._wake_held_requests()

    def _close_listeners(self) -> None:
        # Both closes are synchronous: new connections are refused from here on.
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._pending_socket is not None:
            self._pending_socket.close()
            self._pending_socket = None

    async def _serve_on(self, sock: socket.socket) -> None:
        if sock is not self._pending_socket:
            return  # refused again (and the socket closed) before this task ran
        self._pending_socket = None
        assert self._loop is not None and self._runner is not None
        assert self._runner.server is not None
        server = await self._loop.create_server(self._runner.server, sock=sock)
        if self._faults.mode == "refuse" or self._stopping:
            server.close()  # the mode flipped back while we were starting up
        else:
            self._listener = server

    def _wake_held_requests(self) -> None:
        held, self._mode_changed = self._mode_changed, asyncio.Event()
        held.set()

    # -- counters --------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters and the AssumeRole timeline (faults stay as they are)."""
        self._requests_total = 0
        self._assume_role_forwarded = 0
        self._assume_role_throttled = 0
        self._assume_role_failed = 0
        self._requests_reset = 0
        self._requests_held = 0
        self._assume_role_times: list[float] = []
        self._assume_role_calls: list[RecordedCall] = []
        self._requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=MAX_RECORDED_REQUESTS
        )

    def assume_role_calls(self) -> list[RecordedCall]:
        """Every AssumeRole call received, in order, with its parameters and signing key."""
        return list(self._assume_role_calls)

    def recorded_requests(self) -> list[RecordedRequest]:
        """The latest requests received (admin calls aside), oldest first, with their signers."""
        return list(self._requests)

    def assume_role_timeline(self) -> list[float]:
        """Monotonic arrival times of every AssumeRole call received."""
        return list(self._assume_role_times)

    def max_rate(self, window: float = 1.0) -> float:
        """The highest AssumeRole rate (calls per second) over any `window`-second interval."""
        if window <= 0:
            raise ValueError("window must be positive")
        return max_calls_in_window(self._assume_role_times, window) / window

    def stats(self) -> dict[str, object]:
        return {
            "requests_total": self._requests_total,
            "assume_role_calls": len(self._assume_role_times),
            "assume_role_forwarded": self._assume_role_forwarded,
            "assume_role_throttled": self._assume_role_throttled,
            "assume_role_failed": self._assume_role_failed,
            "requests_reset": self._requests_reset,
            "requests_held": self._requests_held,
            "max_rate_1s": self.max_rate(1.0),
            "faults": asdict(self._faults),
        }

    # -- the proxy -------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if _is_admin_path(request.path):
            # Admin calls go to admin_url; forwarding them would hand them to the upstream.
            return web.json_response({"error": "not found"}, status=404)
        self._requests_total += 1
        self._requests.append(
            RecordedRequest(
                request.method, request.path, signing_key(request), self._clock.monotonic()
            )
        )
        length = request.content_length
        small = length is not None and length <= MAX_ACTION_SNIFF_BYTES
        body = await request.read() if small else None
        is_assume_role = sts_action(request, body) == "AssumeRole"
        if is_assume_role:
            now = self._clock.monotonic()
            self._assume_role_times.append(now)
            self._assume_role_calls.append(_recorded(request, body, now))

        if self._faults.mode == "blackhole":
            self._requests_held += 1
        while self._faults.mode == "blackhole" and not self._stopping:
            await self._mode_changed.wait()
        if self._faults.mode in ("reset", "refuse") or self._stopping:
            # On a connection accepted before `refuse`, dropping it is the closest equivalent.
            self._requests_reset += 1
            _reset_connection(request)
            return web.Response(status=500)  # never sent: the transport is already gone

        faults = self._faults
        delay = faults.latency + self._random.uniform(0.0, faults.jitter)
        if delay > 0:
            await asyncio.sleep(delay)

        if is_assume_role:
            if self._random.random() < faults.throttle_fraction:
                self._assume_role_throttled += 1
                return sts_error(400, "Sender", "Throttling", "Rate exceeded")
            if self._random.random() < faults.error_fraction:
                self._assume_role_failed += 1
                return sts_error(500, "Receiver", "InternalFailure", "Internal failure")
            if faults.refuse_code:
                self._assume_role_failed += 1
                return sts_error(400, "Sender", faults.refuse_code, "Refused by the fault proxy")
            self._assume_role_forwarded += 1
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

    # -- admin API -------------------------------------------------------------------------

    async def _admin_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self._faults))

    async def _admin_set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            self.set(**changes)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self._faults))

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset_counters()
        return web.json_response(self.stats())


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        loop = task.get_loop()
        loop.call_exception_handler(
            {"message": "fault proxy could not listen again", "exception": exc}
        )
