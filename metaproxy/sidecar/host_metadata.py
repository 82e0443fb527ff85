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
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from metaproxy.errors import ConfigError
from metaproxy.sidecar.httpclient import Endpoint, HttpClient, HttpClientError

log = logging.getLogger("metaproxy.sidecar.host_metadata")

TOKEN_TTL_SECONDS = 21_600
MAX_BODY_BYTES = 64 * 1024
MAX_CACHE_ENTRIES = 256
# Letters, digits and the punctuation IMDS names use (`macs/02:ab:…`, `block-device-mapping`);
# a leading alphanumeric rules out `.`, `..` and hidden tricks before anything reaches the host.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Whatever the allow-list says: the host's role and credentials, its SSH keys, its user-data
# (often secrets) and its signed identity documents (the task has its own) never come through.
_DENY = re.compile(
    r"^(meta-data/(iam|identity-credentials|public-keys)(/|$)|dynamic(/|$))|(^|/)user-data(/|$)",
    re.IGNORECASE,
)


def normalise(path: str) -> str | None:
    """`meta-data//placement/` → `meta-data/placement`; None if any segment is not a plain name."""
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 16 or not all(_SEGMENT.fullmatch(s) for s in segments):
        return None
    return "/".join(segments)


def permitted(path: str, allow: tuple[str, ...]) -> bool:
    """True if `path` (relative to the version, e.g. `meta-data/ami-launch-index`) may be
    fetched from the host: normalised, not denied, and at or below an allow-list entry."""
    clean = normalise(path)
    if clean is None or _DENY.search(clean):
        return False
    for entry in allow:
        prefix = normalise(entry)
        if prefix is not None and (clean == prefix or clean.startswith(prefix + "/")):
            return True
    return False


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
        timeout: float = 1.0,
        cache_seconds: float = 10.0,
        failure_cache_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            # The host's IMDS is plain HTTP on a link-local address, never through a proxy.
            raise ConfigError(f"host_metadata_url: {base_url!r} must be an http:// URL")
        self._http = HttpClient(
            Endpoint(url.hostname, url.port or 80), max_answer_bytes=MAX_BODY_BYTES
        )
        self.allow = allow
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._failure_cache_seconds = failure_cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, _Cached] = {}
        self._in_flight: dict[str, asyncio.Task[str | None]] = {}
        self._token: tuple[str, float] | None = None
        self.host_requests = 0  # how often the host was actually asked (tests, metrics)

    def permits(self, path: str) -> bool:
        return permitted(path, self.allow)

    async def __call__(self, path: str) -> str | None:
        if not permitted(path, self.allow):
            return None
        clean = normalise(path)
        assert clean is not None  # permitted() normalised it already
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
            self.host_requests += 1
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
