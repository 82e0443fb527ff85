"""`metaproxy certs init`: a private CA whose broker certificate a CA-pinned client accepts."""

from __future__ import annotations

import argparse
import ipaddress
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from metaproxy.commands import certs
from metaproxy.errors import ConfigError


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello over tls")


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    """A real aiohttp server on 127.0.0.1, port 0, presenting broker.pem."""
    paths = certs.init_certs(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths["broker.pem"], paths["broker.key"])
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield paths["ca.pem"], port
    finally:
        await runner.cleanup()


async def test_client_trusting_only_the_ca_connects(tls_server: tuple[Path, int]) -> None:
    """A client whose only trust anchor is ca.pem verifies the broker's certificate."""
    ca, port = tls_server
    context = ssl.create_default_context(cafile=str(ca))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/", ssl=context) as response,
    ):
        assert response.status == 200
        assert await response.text() == "hello over tls"


async def test_client_not_trusting_the_ca_fails_verification(tls_server: tuple[Path, int]) -> None:
    """A client using the system trust store refuses the broker's certificate."""
    _, port = tls_server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"https://127.0.0.1:{port}/", ssl=ssl.create_default_context())


def test_certificates_have_the_right_extensions(tmp_path: Path) -> None:
    """CA: basicConstraints CA; broker: P-256, serverAuth, IP and DNS SANs; keys 0600."""
    paths = certs.init_certs(tmp_path, ["127.0.0.1", "broker.example", "::1"], days=30)
    assert set(paths) == {"ca.pem", "ca.key", "broker.pem", "broker.key"}
    for name in ("ca.key", "broker.key"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(paths["ca.pem"].read_bytes())
    broker = x509.load_pem_x509_certificate(paths["broker.pem"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not broker.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(broker.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(broker.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    broker.verify_directly_issued_by(ca)
    lifetime = broker.not_valid_after_utc - broker.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        pytest.param(["bad host"], 365, "neither an IP", id="space-in-host"),
        pytest.param(["-leading.example"], 365, "neither an IP", id="leading-hyphen"),
        pytest.param([""], 365, "at least one host", id="no-hosts"),
        pytest.param(["localhost"], 0, "days", id="zero-days"),
    ],
)
def test_init_certs_validates_inputs(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    """Invalid hosts or validity are refused before anything is written."""
    with pytest.raises(ConfigError, match=message):
        certs.init_certs(tmp_path / "out", hosts, days)
    assert not (tmp_path / "out").exists()


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="metaproxy")
    certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_cli_init_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """`certs init DIR --hosts` writes the files; running it again needs --force."""
    assert run("certs", "init", str(tmp_path), "--hosts", "10.0.0.1,broker.local") == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    broker = x509.load_pem_x509_certificate((tmp_path / "broker.pem").read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local"]
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        run("certs", "init", str(tmp_path))
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert run("certs", "init", str(tmp_path), "--force") == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca
