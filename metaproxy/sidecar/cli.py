"""`metaproxy sidecar`: one per task; serves IMDS and container credentials until SIGTERM."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from metaproxy.process.servercmd import register_process
from metaproxy.sidecar.config import SidecarConfig

if TYPE_CHECKING:
    from metaproxy.sidecar.process import Sidecar


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_process(subparsers, "sidecar", "run a task's metadata sidecar", SidecarConfig, _root)


def _root(config: SidecarConfig) -> Sidecar:
    from metaproxy.sidecar.heap import release_free_heap, trim_free_heap
    from metaproxy.sidecar.process import Sidecar

    # Process-wide steps, so here and not in the root (the tests run many in one process).
    return Sidecar(config, on_started=release_free_heap, after_burst=trim_free_heap)
