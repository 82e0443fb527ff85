"""`metaproxy broker`: serve credential requests until SIGTERM, then drain (`serve(root)`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from metaproxy.broker.config import BrokerConfig
from metaproxy.process.servercmd import register_process

if TYPE_CHECKING:
    from metaproxy.broker.server import BrokerServer


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_process(
        subparsers, "broker", "run the multi-tenant credential broker", BrokerConfig, _root
    )


def _root(config: BrokerConfig) -> BrokerServer:
    from metaproxy.broker.server import BrokerServer
    from metaproxy.config import readable_paths
    from metaproxy.process.runtime import settle_gc

    # Building the broker reads its files (TLS pair, policies, keys): a missing one is named by
    # its flag first, as `serve` would name it.
    readable_paths(config)
    # A process-wide step, so here and not in the root (the tests run many in one process).
    return BrokerServer(config, on_started=settle_gc)
