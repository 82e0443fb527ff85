"""`metaproxy broker`: serve credential requests until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from metaproxy.broker.config import BrokerConfig
from metaproxy.process.servercmd import register_server

log = logging.getLogger("metaproxy.broker")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_server(
        subparsers, "broker", "run the multi-tenant credential broker", BrokerConfig, _serve
    )


async def _serve(config: BrokerConfig, ready_file: Path | None) -> int:
    from metaproxy.broker.server import BrokerServer
    from metaproxy.process.runtime import Lifecycle, settle_gc, write_ready_file

    server = await BrokerServer.start(config)
    settle_gc()
    lifecycle = Lifecycle()
    lifecycle.install(on_reload=server.policies.reload)
    if ready_file is not None:
        write_ready_file(
            ready_file,
            {
                "url": server.url,
                "admin_url": server.admin_url,
                "control_url": server.control_url,
                "instance": config.instance,
                "pid": os.getpid(),
            },
        )
    await lifecycle.wait()
    log.info("draining (at most %.0fs)", config.drain_seconds)
    await server.aclose()
    return 0
