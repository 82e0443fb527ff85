"""The sidecar's TLS client context towards the broker: it verifies the chain and the name as
`ssl.create_default_context()` does, and hands `ssl` ASCII names as bytes (no idna codec)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest

from metaproxy.sidecar.trust import AsciiNameContext, client_context
from tests.support import Pki


@pytest.fixture
async def tls_port(pki: Pki) -> AsyncIterator[int]:
    """A TLS server on loopback with the broker's certificate (localhost, 127.0.0.1)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.broker_cert, pki.broker_key)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=server_context)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def test_the_context_verifies_as_the_default_one_does(pki: Pki) -> None:
    """Certificate required, name checked, the given CA trusted and no other; TLS 1.2 at least."""
    context = client_context(pki.ca.read_text())
    default = ssl.create_default_context(cadata=pki.ca.read_text())
    assert isinstance(context, AsciiNameContext)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.verify_flags == default.verify_flags
    assert context.minimum_version == default.minimum_version
    assert context.options == default.options
    assert context.get_ca_certs() == default.get_ca_certs()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "LocalHost"])
async def test_a_name_on_the_certificate_connects(pki: Pki, tls_port: int, name: str) -> None:
    """An ASCII name or address the certificate carries (in any case) is accepted."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls_port, ssl=client_context(pki.ca.read_text()), server_hostname=name
    )
    assert await reader.read() == b"hello"
    writer.close()


@pytest.mark.parametrize("name", ["broker.example", "127.0.0.2", "lócalhost"])
async def test_a_name_not_on_the_certificate_is_refused(pki: Pki, tls_port: int, name: str) -> None:
    """Another name, another address, a non-ASCII name (through the idna codec): refused."""
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", tls_port, ssl=client_context(pki.ca.read_text()), server_hostname=name
        )


async def test_another_ca_is_refused(
    tmp_path_factory: pytest.TempPathFactory, tls_port: int
) -> None:
    """A server whose chain the given CA did not sign is refused."""
    from metaproxy.commands.certs import init_certs

    other = init_certs(tmp_path_factory.mktemp("other-ca"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1",
            tls_port,
            ssl=client_context(other["ca.pem"].read_text()),
            server_hostname="localhost",
        )
