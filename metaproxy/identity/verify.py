"""Verifying identity tokens: the broker's only source of truth about who is asking.

A token is checked from the outside in, and stops at the first failed check: its compact JWS
shape and header (`jws.py`), its issuer among the trusted ones and the key its `kid` names in
that issuer's JWKS, which pins the algorithm (`trusted_keys.py`), its signature, then its claims
(`claims.py`); what they say is then read as an `Identity` (`identities.py`, `spiffe.py`: a
JWT-SVID's issuer is the trust domain its `sub` names). Rejections raise
`Unauthenticated` whose detail names the failed check and never the token.

An issuer's keys come from its JWKS file, or from a URL (`remote_keys.py`): the verifier is then
a component, whose `start()` fetches them and keeps them fresh, and `verify_fetching` fetches
again when a token names a key the set lacks (rate-limited per issuer).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaproxy.clock import Clock, SystemClock
from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity import jws
from metaproxy.identity.claims import check_claims
from metaproxy.identity.identities import kubernetes_identity, platform_identity
from metaproxy.identity.jwks_fetch import JwksClient
from metaproxy.identity.remote_keys import Fetching, KeySetStats, RemoteKeys
from metaproxy.identity.spiffe import (
    DEFAULT_PATHS,
    SCHEME,
    parse_rules,
    spiffe_identity,
    trust_domain_of,
)
from metaproxy.identity.trusted_keys import IssuerKeys, UnknownKid
from metaproxy.models import Identity


class IdentityVerifier:
    """Verifies platform, Kubernetes and SPIFFE identity tokens against the trusted issuers'
    keys."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        leeway: int = 30,
        clock: Clock | None = None,
        cluster_name: str = "",
        cluster_arn: str = "",
        fetching: Fetching | None = None,
        jwks_ca_file: Path | None = None,
        spiffe_paths: Sequence[str] = DEFAULT_PATHS,
    ) -> None:
        """`cluster_name`, `cluster_arn`: the cluster Kubernetes identities come from, for
        EKS Pod Identity-compatible session tags (`${cluster_name}`, `${cluster_arn}`).
        `fetching`, `jwks_ca_file`: how keys of issuers given by URL are fetched.
        `spiffe_paths`: how SPIFFE ID paths name an app and a task (`spiffe.py`)."""
        if not 0 <= leeway <= 300:
            raise ConfigError("token leeway must be between 0 and 300 seconds")
        self._leeway = leeway
        self._clock: Clock = clock or SystemClock()
        self._cluster = (cluster_name, cluster_arn)
        self._spiffe_paths = parse_rules(spiffe_paths)
        self._issuers: dict[str, IssuerKeys | RemoteKeys] = {}
        self._remote: list[RemoteKeys] = []
        fetching = fetching or Fetching()
        self._client: JwksClient | None = None
        for trust in issuers:
            if trust.issuer in self._issuers:
                raise ConfigError(f"issuer {trust.issuer!r} is trusted twice")
            if trust.jwks_file is not None:
                self._issuers[trust.issuer] = IssuerKeys.load(trust, trust.jwks_file)
                continue
            if self._client is None:
                self._client = JwksClient(ca_file=jwks_ca_file, timeout=fetching.timeout)
            remote = RemoteKeys(trust, self._client, self._clock, fetching)
            self._issuers[trust.issuer] = remote
            self._remote.append(remote)

    async def start(self) -> None:
        """Fetch the keys of issuers given by URL (each failure logged and retried)."""
        if self._client is not None:
            await self._client.start()
        await asyncio.gather(*(remote.start() for remote in self._remote))

    async def aclose(self) -> None:
        for remote in self._remote:
            await remote.aclose()
        if self._client is not None:
            await self._client.aclose()

    def key_sets(self) -> tuple[KeySetStats, ...]:
        """The fetched key sets' ages and failures, for /metrics."""
        return tuple(remote.stats() for remote in self._remote)

    async def verify_fetching(self, token: str) -> Identity:
        """`verify`, fetching the issuer's keys again (rate-limited) when the token names a key
        its set lacks: the issuer may have published it since the last fetch."""
        # Twice: a fetch joined in flight may have left before the key was published; the
        # second asks for a fetch of its own (still at most one per interval).
        for _ in range(2):
            try:
                return self.verify(token)
            except UnknownKid as exc:
                keys = self._issuers.get(exc.issuer)
                if not isinstance(keys, RemoteKeys) or not await keys.fetch_for_unknown_kid():
                    raise
        return self.verify(token)

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or `Unauthenticated` naming the failed check."""
        header, claims = jws.parse(token)
        jws.check_header(header)
        keys = self._keys_for(claims)
        keys.refresh()
        key, alg = keys.select(header)
        if header["alg"] != alg:
            raise Unauthenticated(
                f"alg {header['alg']!r} does not match the key's pinned {alg}",
                reason="bad_signature",
            )
        trust = keys.trust
        if alg == "RS256" and trust.kind == "platform":
            raise Unauthenticated(
                "RS256 is accepted only from kubernetes issuers (and spiffe ones)",
                reason="bad_signature",
            )
        jws.check_signature(token, key, alg)
        check_claims(claims, trust, now=self._clock.now().timestamp(), leeway=self._leeway)
        if trust.kind == "spiffe":
            return spiffe_identity(claims, self._spiffe_paths)
        if trust.kind == "kubernetes":
            cluster_name, cluster_arn = self._cluster
            return dataclasses.replace(
                kubernetes_identity(claims), cluster_name=cluster_name, cluster_arn=cluster_arn
            )
        return platform_identity(claims)

    def _keys_for(self, claims: Mapping[str, Any]) -> IssuerKeys | RemoteKeys:
        """The trusted issuer's keys: by `iss`, or for a JWT-SVID by its `sub`'s trust domain."""
        issuer = claims.get("iss")
        if isinstance(issuer, str):
            keys = self._issuers.get(issuer)
            if keys is not None and keys.trust.kind != "spiffe":
                return keys
        domain = trust_domain_of(claims)
        if domain is not None:
            keys = self._issuers.get(SCHEME + domain)
            if keys is not None and keys.trust.kind == "spiffe":
                return keys
        raise Unauthenticated("untrusted issuer (iss)", reason="unknown_issuer")
