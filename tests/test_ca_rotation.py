"""Rotating the broker CA under steady refreshes: a bundle with both CAs, then the broker's
certificate from the new CA, then the old CA removed — not one failed refresh, no restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from metaproxy.broker.server import BrokerServer
from metaproxy.commands.certs import init_certs
from metaproxy.fsutil import write_atomically
from metaproxy.sidecar.process import Sidecar
from tests.support import Pki, broker_config, issue, sidecar_config, wait_ready


class Relay:
    """A TCP relay standing where the broker is: `target` is where new connections go, so
    changing it is the broker's certificate changing at the same address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections: dict[tuple[str, int], int] = {}
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        self.connections[target] = self.connections.get(target, 0) + 1
        up_reader, up_writer = await asyncio.open_connection(*target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ]
        self._pipes.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pipes.difference_update(tasks)

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


def address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_ca_rotation_under_steady_refreshes(
    tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, broker: BrokerServer
) -> None:
    """Old CA → both CAs → new certificate → new CA only: every refresh succeeds, the sidecar
    re-reads the bundle at each step and its last connections go to the new certificate."""
    new = init_certs(tmp_path / "new-ca")
    (tmp_path / "b2").mkdir()
    new_broker = await BrokerServer.start(
        broker_config(
            tmp_path / "b2", pki, sts_url, policies_dir,
            tls_cert=new["broker.pem"], tls_key=new["broker.key"], control_listen="",
        )
    )  # fmt: skip
    relay = Relay(address(broker.url))
    url = await relay.start()
    bundle = tmp_path / "bundle.pem"
    old_ca, new_ca = pki.ca.read_bytes(), new["ca.pem"].read_bytes()
    write_atomically(bundle, old_ca, 0o644)
    token_file = tmp_path / "rotate.jwt"
    token_file.write_text(issue(pki, "t-rotate", "acme"))
    # A revocation check every 0.2 s: a steady stream of refreshes through the rotation.
    config = sidecar_config(
        tmp_path, pki, url, token_file, broker_ca_file=bundle, revocation_check_seconds=0.2
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    keeper, trust = sidecar.state.keeper, sidecar.state.client.trust
    try:
        await wait_ready(sidecar.admin_url)

        async def refreshes(count: int) -> None:
            target = keeper.refreshes + count
            await until(lambda: keeper.refreshes >= target)

        await refreshes(3)
        write_atomically(bundle, old_ca + new_ca, 0o644)  # 1. both CAs
        await until(lambda: trust.reloads == 1)
        await refreshes(3)
        relay.target = address(new_broker.url)  # 2. the broker's certificate from the new CA
        await refreshes(5)
        write_atomically(bundle, new_ca, 0o644)  # 3. the old CA removed
        await until(lambda: trust.reloads == 2)
        await refreshes(5)

        assert keeper.failures == 0
        assert keeper.current() is not None
        assert relay.connections.get(address(new_broker.url), 0) >= 1
        assert len(trust.context().get_ca_certs()) == 1
    finally:
        await sidecar.aclose()
        await relay.aclose()
        await new_broker.aclose()


async def test_a_broken_bundle_keeps_the_last_good_one(
    tmp_path: Path, pki: Pki, broker: BrokerServer
) -> None:
    """A bundle caught half-written (no certificate in it) is not taken: refreshes go on with the
    last good bundle, and the fixed file is taken when it comes."""
    bundle = tmp_path / "bundle.pem"
    write_atomically(bundle, pki.ca.read_bytes(), 0o644)
    token_file = tmp_path / "half.jwt"
    token_file.write_text(issue(pki, "t-half", "acme"))
    config = sidecar_config(
        tmp_path, pki, broker.url, token_file, broker_ca_file=bundle, revocation_check_seconds=0.2
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    keeper, trust = sidecar.state.keeper, sidecar.state.client.trust
    try:
        await wait_ready(sidecar.admin_url)
        write_atomically(bundle, b"-----BEGIN CERTIFICATE-----\nMII", 0o644)
        await until(lambda: trust.problem is not None)
        target = keeper.refreshes + 3
        await until(lambda: keeper.refreshes >= target)
        write_atomically(bundle, pki.ca.read_bytes(), 0o644)
        await until(lambda: trust.problem is None and trust.reloads == 1)
        assert keeper.failures == 0
    finally:
        await sidecar.aclose()
