"""The fault proxy's port that refuses connections and listens again on the same port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from metaproxy.testing.refusable import RefusablePort


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello\n")
        transport.close()


@pytest.fixture
async def port() -> AsyncIterator[RefusablePort]:
    listening = RefusablePort(Hello)
    await listening.listen()
    yield listening
    listening.refuse()


async def greeting(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_refuse_refuses_at_once_and_listen_again_serves_on_the_same_port(
    port: RefusablePort,
) -> None:
    """Connections are refused from the moment refuse returns; then served on the same port."""
    number = port.port
    assert await greeting(number) == b"hello\n"
    port.refuse()
    with pytest.raises(ConnectionRefusedError):
        await greeting(number)
    port.listen_again()
    assert port.port == number
    assert await greeting(number) == b"hello\n"  # connected at once: waits in the backlog


async def test_refused_again_before_the_loop_serves_it_stays_refused(
    port: RefusablePort,
) -> None:
    """A listen_again undone by refuse before the event loop ran leaves the port refusing."""
    port.refuse()
    port.listen_again()
    port.refuse()
    await asyncio.sleep(0.05)  # the task that would have served has run by now
    with pytest.raises(ConnectionRefusedError):
        await greeting(port.port)
