"""A token issuer on loopback: HTTPS with its own CA, OIDC discovery and a JWKS it can rotate.

Stands in for a Kubernetes API server's `/openid/v1/jwks`, an OIDC provider, or SPIRE's bundle
endpoint (`bundle()`): the tests publish and withdraw keys, take it away, and count its fetches.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from metaproxy.commands import certs
from metaproxy.identity.keys import generate_keypair, jwk_thumbprint, public_jwk


class LocalIssuer:
    """`start()` serves `/.well-known/openid-configuration` and `/jwks` on 127.0.0.1:0."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        paths = certs.init_certs(directory / "tls")
        self.ca_file = paths["ca.pem"]
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(paths["broker.pem"], paths["broker.key"])
        self.published: list[dict[str, Any]] = []  # the JWKS entries served now
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.issuer_override: str | None = None  # a discovery document naming someone else
        self.spiffe_bundle = False  # serve SPIRE's bundle format (x509-svid entries too)
        self.padding = 0  # bytes of an extra member: a JWKS too large to accept
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return self.url + "/jwks"

    def new_key(self, name: str) -> Path:
        """A fresh Ed25519 signing key (PKCS8 PEM path); not published until `publish`."""
        key_path, _ = generate_keypair(self.directory / "keys", name, "EdDSA")
        return key_path

    def publish(self, key_path: Path) -> None:
        jwks = json.loads(key_path.with_suffix(".jwks.json").read_text())
        self.published.extend(jwks["keys"])

    def withdraw(self, key_path: Path) -> None:
        kid = json.loads(key_path.with_suffix(".jwks.json").read_text())["keys"][0]["kid"]
        self.published = [jwk for jwk in self.published if jwk["kid"] != kid]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # The same port when it comes back: the broker keeps fetching the URL it was given.
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def aclose(self) -> None:
        """The issuer goes away: its port refuses connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        issuer = self.issuer_override or self.url
        return web.json_response({"issuer": issuer, "jwks_uri": self.jwks_url})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        keys = list(self.published)
        if self.spiffe_bundle:
            keys = [{**jwk, "use": "jwt-svid"} for jwk in keys]
            keys.append(_x509_svid_entry())
            return web.json_response({"keys": keys, "spiffe_sequence": 1})
        return web.json_response({"keys": keys, "padding": "x" * self.padding})


def _x509_svid_entry() -> dict[str, Any]:
    """What SPIRE's bundle carries beside JWT keys: an X.509 CA (cert omitted), not a signer."""
    jwk: dict[str, Any] = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    return {**jwk, "kid": jwk_thumbprint(jwk), "use": "x509-svid", "x5c": ["MIIB"]}
