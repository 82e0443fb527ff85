"""Verifying identity tokens: the broker's only source of truth about who is asking.

A token is checked from the outside in, and stops at the first failed check: its compact JWS
shape and header (`jws.py`), its issuer among the trusted ones and the key its `kid` names in
that issuer's JWKS, which pins the algorithm (`trusted_keys.py`), its signature, then its claims
(`claims.py`); what they say is then read as an `Identity` (`identities.py`). Rejections raise
`Unauthenticated` whose detail names the failed check and never the token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from metaproxy.clock import Clock, SystemClock
from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity import jws
from metaproxy.identity.claims import check_claims
from metaproxy.identity.identities import kubernetes_identity, platform_identity
from metaproxy.identity.trusted_keys import IssuerKeys
from metaproxy.models import Identity


class IdentityVerifier:
    """Verifies platform and Kubernetes identity tokens against the trusted issuers' JWKS files."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        leeway: int = 30,
        clock: Clock | None = None,
        cluster_name: str = "",
        cluster_arn: str = "",
    ) -> None:
        """`cluster_name`, `cluster_arn`: the cluster Kubernetes identities come from, for
        EKS Pod Identity-compatible session tags (`${cluster_name}`, `${cluster_arn}`)."""
        if not 0 <= leeway <= 300:
            raise ConfigError("token leeway must be between 0 and 300 seconds")
        self._leeway = leeway
        self._clock: Clock = clock or SystemClock()
        self._cluster = (cluster_name, cluster_arn)
        self._issuers: dict[str, IssuerKeys] = {}
        for trust in issuers:
            if trust.issuer in self._issuers:
                raise ConfigError(f"issuer {trust.issuer!r} is trusted twice")
            self._issuers[trust.issuer] = IssuerKeys.load(trust)

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or `Unauthenticated` naming the failed check."""
        header, claims = jws.parse(token)
        jws.check_header(header)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise Unauthenticated("untrusted issuer (iss)", reason="unknown_issuer")
        keys = self._issuers[issuer]
        keys.refresh()
        key, alg = keys.select(header)
        if header["alg"] != alg:
            raise Unauthenticated(
                f"alg {header['alg']!r} does not match the key's pinned {alg}",
                reason="bad_signature",
            )
        trust = keys.trust
        if alg == "RS256" and trust.kind != "kubernetes":
            raise Unauthenticated(
                "RS256 is accepted only from kubernetes issuers", reason="bad_signature"
            )
        jws.check_signature(token, key, alg)
        check_claims(claims, trust, now=self._clock.now().timestamp(), leeway=self._leeway)
        if trust.kind == "kubernetes":
            cluster_name, cluster_arn = self._cluster
            return dataclasses.replace(
                kubernetes_identity(claims), cluster_name=cluster_name, cluster_arn=cluster_arn
            )
        return platform_identity(claims)
