"""Broker replicas sharing one real Valkey/Redis store, for the fleet's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from metaproxy.broker.server import BrokerServer
from metaproxy.broker.store.sealing import generate_key_line
from tests.support import CONTROL_TOKEN, Pki, broker_config


def store_key_file(directory: Path) -> Path:
    path = directory / "store.key"
    if not path.exists():
        path.write_text(generate_key_line() + "\n")
        path.chmod(0o600)
    return path


@dataclass
class Fleet:
    """Replicas started in this process, each its own instance name and audit directory."""

    tmp: Path
    pki: Pki
    sts_url: str
    policies_dir: Path
    store_url: str
    replicas: list[BrokerServer] = field(default_factory=list)
    on_stop: Callable[[BrokerServer], None] | None = None

    async def start_replica(self, name: str = "", **overrides: Any) -> BrokerServer:
        """A replica named `name` (its audit chain and directory): a restart when the name was
        used before; by default the next `replica-N` not in use."""
        taken = {replica.config.instance for replica in self.replicas}
        number = len(self.replicas) + 1
        while not name and f"replica-{number}" in taken:
            number += 1
        name = name or f"replica-{number}"
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        config = broker_config(
            self.tmp / name,
            self.pki,
            self.sts_url,
            self.policies_dir,
            **{
                "store": self.store_url,
                "store_key_file": store_key_file(self.tmp),
                "instance": name,
                "heartbeat_seconds": 0.5,
                "revocation_resync_seconds": 0.5,
                **overrides,
            },
        )
        server = await BrokerServer.start(config)
        self.replicas.append(server)
        return server

    async def stop(self, server: BrokerServer) -> None:
        if server in self.replicas:
            self.replicas.remove(server)
            if self.on_stop is not None:
                self.on_stop(server)
            await server.aclose()

    async def stop_all(self) -> None:
        for server in list(self.replicas):
            await self.stop(server)


async def control(
    https: aiohttp.ClientSession, replica: BrokerServer, path: str, body: object | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    method = https.get if body is None else https.post
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    async with method(replica.control_url + path, **kwargs) as answer:
        return answer.status, await answer.json()


async def ask(
    https: aiohttp.ClientSession, replica: BrokerServer, token: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with https.post(replica.url + "/v1/credentials", json={}, headers=headers) as answer:
        body = await answer.json()
        return answer.status, {**body, "_retry_after": answer.headers.get("Retry-After")}


Asker = Callable[[BrokerServer, str], Awaitable[int]]
