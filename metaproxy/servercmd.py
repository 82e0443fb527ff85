"""The shape every long-running command shares (`metaproxy broker`, `metaproxy sidecar`): config
flags and environment built into the frozen config, logging set up, a `--ready-file`, and the
server's coroutine run on the event loop until a signal."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from metaproxy.config import BrokerConfig, SidecarConfig, add_config_arguments

C = TypeVar("C", SidecarConfig, BrokerConfig)
Serve = Callable[[C, Path | None], Coroutine[Any, Any, int]]


def register_server(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    config_class: type[C],
    serve: Serve[C],
) -> None:
    parser = subparsers.add_parser(name, help=help_text)
    add_config_arguments(parser, config_class)
    parser.add_argument("--ready-file", type=Path, help="write bound URLs here once listening")

    def run_command(args: argparse.Namespace) -> int:
        from metaproxy.config import build_config
        from metaproxy.logs import setup_logging
        from metaproxy.runtime import run

        config = build_config(config_class, args)
        setup_logging(config.log_format)
        return run(serve(config, args.ready_file))

    parser.set_defaults(func=run_command)
