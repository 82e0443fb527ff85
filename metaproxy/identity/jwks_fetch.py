"""Fetching an issuer's JWKS over HTTPS: directly, or through its OIDC discovery document.

The broker trusts what these documents say about who signed a token, so they are read as
strictly as a JWKS file: TLS verified against `--jwks-ca-file` (or the system's CAs), no
redirects (a redirect could lead the fetch to a host the CA bundle was never meant to vouch
for), no plain HTTP, at most `MAX_JWKS_BYTES`, and a discovery document must name the issuer
it was fetched for (OpenID Connect Discovery 1.0, section 4.3) and an https:// `jwks_uri`.
Failures raise `Unavailable` (the issuer did not answer usefully) or `ConfigError` (it answered
with a document we refuse), naming the URL and never the body.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from metaproxy.config import DISCOVERY_PATH, TrustedIssuer
from metaproxy.errors import ConfigError, Unavailable
from metaproxy.identity.jwks import MAX_JWKS_BYTES, parse_jwks
from metaproxy.identity.trusted_keys import KeySet


class JwksClient:
    """One HTTPS client for every issuer given by URL: `start()` opens it, `aclose()` ends it."""

    def __init__(self, *, ca_file: Path | None = None, timeout: float = 5.0) -> None:
        # Built here, not at start: a CA bundle that cannot be read refuses the broker's start.
        try:
            self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--jwks-ca-file: {ca_file}: cannot load CA bundle ({exc})") from None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls, limit_per_host=2),
            timeout=self._timeout,
            headers={"Accept": "application/json"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def keys(self, trust: TrustedIssuer) -> KeySet:
        """The issuer's keys as it publishes them now."""
        url = trust.jwks_url
        if url.endswith(DISCOVERY_PATH):
            url = await self._jwks_uri(trust, url)
        return parse_jwks(await self._get(url), url)

    async def _jwks_uri(self, trust: TrustedIssuer, url: str) -> str:
        document: Any
        try:
            document = json.loads(await self._get(url))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"discovery document {url} is not valid JSON") from None
        if not isinstance(document, dict):
            raise ConfigError(f"discovery document {url} is not an object")
        # A document naming another issuer describes someone else's keys.
        if document.get("issuer") != trust.issuer:
            raise ConfigError(f"discovery document {url} names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ConfigError(f"discovery document {url} has no https:// jwks_uri")
        return jwks_uri

    async def _get(self, url: str) -> bytes:
        if self._session is None:
            raise Unavailable(f"JWKS client not started (fetching {url})")
        try:
            async with self._session.get(url, allow_redirects=False) as answer:
                if answer.status != 200:
                    raise Unavailable(f"{url} answered HTTP {answer.status}")
                body = bytearray()
                # Read by chunks and stop past the cap: a huge (or endless) answer is never
                # held whole.
                async for chunk in answer.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ConfigError(f"{url} sent more than {MAX_JWKS_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise Unavailable(f"{url} unreachable: {type(exc).__name__}") from None
        return bytes(body)
