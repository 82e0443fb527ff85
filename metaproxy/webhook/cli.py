"""`metaproxy webhook`: serve the sidecar-injection admission webhook.

The same process shape as the broker and the sidecar (`metaproxy.process.servercmd`): a frozen
`WebhookConfig` from flags and `METAPROXY_*` variables, the shared TLS context, and the shared
lifecycle (SIGTERM/SIGINT drain, SIGHUP reloads the certificate cert-manager rotates).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from metaproxy.process.servercmd import register_server
from metaproxy.webhook.config import WebhookConfig


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_server(
        subparsers,
        "webhook",
        "mutating admission webhook that injects the sidecar into labelled pods",
        WebhookConfig,
        _serve,
        description="Serve POST /mutate (AdmissionReview v1) and GET /healthz. Pods labelled or "
        'annotated metaproxy.io/inject: "true" get the metaproxy sidecar.',
    )


async def _serve(config: WebhookConfig, ready_file: Path | None) -> int:
    from metaproxy.process.runtime import Lifecycle, write_ready_file
    from metaproxy.webhook.app import WebhookServer

    server = await WebhookServer.start(config)
    lifecycle = Lifecycle()
    lifecycle.install(on_reload=server.reload_certificate)
    if ready_file is not None:
        write_ready_file(ready_file, {"url": server.url, "pid": os.getpid()})
    await lifecycle.wait()
    await server.aclose()
    return 0
