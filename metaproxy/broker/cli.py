"""`metaproxy broker`: serve credential requests until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from metaproxy.config import BrokerConfig, add_config_arguments

log = logging.getLogger("metaproxy.broker")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("broker", help="run the multi-tenant credential broker")
    add_config_arguments(parser, BrokerConfig)
    parser.add_argument("--ready-file", type=Path, help="write bound URLs here once listening")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from metaproxy.config import build_config
    from metaproxy.logs import setup_logging
    from metaproxy.runtime import run

    config = build_config(BrokerConfig, args)
    setup_logging(config.log_format)
    return run(_serve(config, args.ready_file))


async def _serve(config: BrokerConfig, ready_file: Path | None) -> int:
    from metaproxy.broker.server import BrokerServer
    from metaproxy.runtime import Lifecycle, write_ready_file

    server = await BrokerServer.start(config)
    lifecycle = Lifecycle()
    lifecycle.install(on_reload=server.services.policies.reload)
    if ready_file is not None:
        write_ready_file(
            ready_file, {"url": server.url, "admin_url": server.admin_url, "pid": os.getpid()}
        )
    await lifecycle.wait()
    log.info("draining (at most %.0fs)", config.drain_seconds)
    await server.stop()
    return 0
