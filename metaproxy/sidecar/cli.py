"""`metaproxy sidecar`: one per task; serves IMDS and container credentials until SIGTERM."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from metaproxy.process.servercmd import register_server
from metaproxy.sidecar.config import SidecarConfig


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_server(subparsers, "sidecar", "run a task's metadata sidecar", SidecarConfig, _serve)


async def _serve(config: SidecarConfig, ready_file: Path | None) -> int:
    from metaproxy.process.runtime import Lifecycle, write_ready_file
    from metaproxy.sidecar.heap import release_free_heap
    from metaproxy.sidecar.server import SidecarServer

    # A process-wide step, so here and not in the server (the tests run many in one process).
    server = await SidecarServer.start(config, on_started=release_free_heap)
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
