"""The narrow door to the host's own IMDS: only allow-listed paths, never the host's secrets.

The task-scoped view answers everything SDKs need; an operator may let a few more host paths
through (`SidecarConfig.host_metadata_allow`, e.g. `meta-data/ami-launch-index`). What is asked
of the host is bounded: paths are normalised and checked segment by segment, a deny-list wins
over the allow-list, every call has a short deadline and a size cap, and answers are cached and
coalesced, so a tenant looping on a passthrough path cannot loop on the host's IMDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metaproxy.errors import ConfigError
from metaproxy.metadata_paths import allowed_below, normalise, permitted
from metaproxy.models import NodeFacts
from metaproxy.sidecar.wire.httpclient import Endpoint, HttpClient, HttpClientError

log = logging.getLogger("metaproxy.sidecar.host_metadata")

TOKEN_TTL_SECONDS = 21_600
FACTS_SECONDS = 300.0
# The node facts the broker puts in the task's view and identity document, and where IMDS has
# each.
_FACT_PATHS = {
    "instance_id": "meta-data/instance-id",
    "instance_type": "meta-data/instance-type",
    "availability_zone": "meta-data/placement/availability-zone",
    "availability_zone_id": "meta-data/placement/availability-zone-id",
    "region": "meta-data/placement/region",
    "local_ipv4": "meta-data/local-ipv4",
}
MAX_BODY_BYTES = 64 * 1024
MAX_CACHE_ENTRIES = 256


def uplink_interface() -> str | None:
    """The interface of this network namespace's default route (`/proc/net/route` is the
    reading process's namespace's), or None."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface, Destination, Gateway, Flags: a default route is destination 0, flag RTF_UP.
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 1:
            return fields[0]
    return None


def is_local_address(address: str) -> bool:
    """True if `address` belongs to this namespace (the pod holds 169.254.169.254 itself)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _is_metadata_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_link_local or ip in ipaddress.ip_network("fd00:ec2::/32")


def resolve_interface(setting: str, address: str) -> tuple[str | None, str]:
    """(the interface to bind to, or None; "" or why the host cannot be reached at all).

    When the pod's namespace holds the host's IMDS address itself (metaproxy's CNI plugin or
    init container put it on `lo`), a plain connection would reach this very sidecar. A socket
    bound to the uplink (SO_BINDTODEVICE, unprivileged since Linux 5.7) skips the local route
    and leaves through it; the plugin's `nodeMetadata` sets `accept_local` there so the
    answer, whose source is one of the pod's own addresses, is accepted."""
    # Only the metadata addresses are ever claimed by the pod; a host service on loopback (a
    # test's, a node agent's) is reached as it is.
    local = _is_metadata_address(address) and is_local_address(address)
    if setting == "none":
        return None, f"{address} is this pod's own address" if local else ""
    if setting != "auto":
        return setting, ""
    if not local:
        return None, ""
    uplink = uplink_interface()
    if uplink is None:
        return None, f"{address} is this pod's own address and there is no default route"
    return uplink, ""


@dataclass(frozen=True, slots=True)
class _Cached:
    body: str | None
    until: float


class HostMetadata:
    """`await host_metadata("meta-data/ami-launch-index")` → the host's answer, or None."""

    def __init__(
        self,
        base_url: str,
        allow: tuple[str, ...],
        *,
        interface: str = "none",
        timeout: float = 1.0,
        cache_seconds: float = 10.0,
        failure_cache_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            # The host's IMDS is plain HTTP on a link-local address, never through a proxy.
            raise ConfigError(f"host_metadata_url: {base_url!r} must be an http:// URL")
        bind_to, unreachable = resolve_interface(interface, url.hostname)
        if unreachable:
            log.warning(
                "the host's metadata is not asked (%s): answers come from the task", unreachable
            )
        self.unreachable = unreachable
        self._http = HttpClient(
            Endpoint(url.hostname, url.port or 80, interface=bind_to),
            max_answer_bytes=MAX_BODY_BYTES,
        )
        self.allow = () if unreachable else allow
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._failure_cache_seconds = failure_cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, _Cached] = {}
        self._in_flight: dict[str, asyncio.Task[str | None]] = {}
        self._token: tuple[str, float] | None = None
        self._facts: tuple[NodeFacts, float] | None = None

    def permits(self, path: str) -> bool:
        return permitted(path, self.allow)

    async def facts(self) -> NodeFacts | None:
        """Where this node is, for the broker's view and identity document (only the fields the
        allow-list gives the task; None when it gives none). Asked again every few minutes: a
        task does not move, but a first answer may have been a timeout."""
        wanted = {name: path for name, path in _FACT_PATHS.items() if self.permits(path)}
        if not wanted:
            return None
        now = self._monotonic()
        if self._facts is not None and now < self._facts[1]:
            return self._facts[0]
        answers = await asyncio.gather(*(self(path) for path in wanted.values()))
        raw = {name: body.strip() for name, body in zip(wanted, answers, strict=True) if body}
        facts = NodeFacts.parse(raw, strict=False)
        self._facts = (facts, now + (FACTS_SECONDS if raw else self._failure_cache_seconds))
        return facts

    def allows_below(self, path: str) -> bool:
        return allowed_below(path, self.allow)

    async def __call__(self, path: str) -> str | None:
        if not permitted(path, self.allow):
            return None
        clean = normalise(path)
        assert clean is not None  # permitted() normalised it already
        return await self._get(clean)

    async def entries(self, directory: str) -> list[str]:
        """The host's listing of `directory`, only the entries that are allowed or lead to an
        allowed path (`tags/` for an allowed `meta-data/tags/instance`)."""
        clean = normalise(directory)
        if clean is None or not allowed_below(clean, self.allow):
            return []
        body = await self._get(clean)
        entries = [line.strip() for line in (body or "").splitlines()]
        return [
            entry
            for entry in entries
            if entry
            and (
                permitted(f"{clean}/{entry}", self.allow)
                or allowed_below(f"{clean}/{entry}", self.allow)
            )
        ]

    async def _get(self, clean: str) -> str | None:
        cached = self._cache.get(clean)
        if cached is not None and self._monotonic() < cached.until:
            return cached.body
        task = self._in_flight.get(clean)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_cache(clean))
            self._in_flight[clean] = task
            task.add_done_callback(functools.partial(self._forget, clean))
        # Shielded: one client giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    def _forget(self, path: str, _task: asyncio.Task[str | None]) -> None:
        self._in_flight.pop(path, None)

    async def aclose(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    async def _fetch_and_cache(self, path: str) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                body, ok = await self._fetch(path)
        except (OSError, HttpClientError, TimeoutError) as exc:
            log.warning("host metadata %s unavailable: %s", path, type(exc).__name__)
            body, ok = None, False
        ttl = self._cache_seconds if ok else self._failure_cache_seconds
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[path] = _Cached(body, self._monotonic() + ttl)
        return body

    async def _fetch(self, path: str) -> tuple[str | None, bool]:
        """(body or None, whether the answer was definite and may be cached for long)."""
        for attempt in range(2):
            token = await self._host_token()
            headers = {"X-aws-ec2-metadata-token": token} if token else {}
            # Redirects are never followed: this client does not follow any.
            answer = await self._http.request("GET", f"/latest/{path}", headers)
            if answer.status == 401 and token and attempt == 0:
                self._token = None  # the host restarted or the token lapsed: one retry
                continue
            if answer.status == 404:
                return None, True
            if answer.status != 200:
                log.warning("host metadata %s answered %d", path, answer.status)
                return None, False
            return answer.body.decode("utf-8", errors="replace"), True
        return None, False

    async def _host_token(self) -> str | None:
        """An IMDSv2 token for the host, reused until a minute before it lapses. None when the
        host refuses tokens (403/404/405), which is how SDKs decide to fall back to IMDSv1."""
        now = self._monotonic()
        if self._token is not None and now < self._token[1]:
            return self._token[0]
        answer = await self._http.request(
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
        )
        if answer.status != 200:
            return None
        token = answer.body[:1024].decode("ascii", errors="replace").strip()
        if not token or not token.isprintable():
            return None
        self._token = (token, now + TOKEN_TTL_SECONDS - 60)
        return token
