"""`metaproxy sidecar`: one per task; serves IMDS and container credentials until SIGTERM."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from metaproxy.config import SidecarConfig, add_config_arguments


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("sidecar", help="run a task's metadata sidecar")
    add_config_arguments(parser, SidecarConfig)
    parser.add_argument("--ready-file", type=Path, help="write bound URLs here once listening")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from metaproxy.config import build_config
    from metaproxy.logs import setup_logging
    from metaproxy.runtime import run

    config = build_config(SidecarConfig, args)
    setup_logging(config.log_format)
    return run(_serve(config, args.ready_file))


async def _serve(config: SidecarConfig, ready_file: Path | None) -> int:
    from metaproxy.runtime import Lifecycle, write_ready_file
    from metaproxy.sidecar.server import SidecarServer

    server = await SidecarServer.start(config)
    lifecycle = Lifecycle()
    lifecycle.install()
    if ready_file is not None:
        write_ready_file(
            ready_file,
            {
                "imds_urls": server.imds_urls,
                "container_urls": server.container_urls,
                "admin_url": server.admin_url,
                "pid": os.getpid(),
            },
        )
    await lifecycle.wait()
    await server.stop()
    return 0
