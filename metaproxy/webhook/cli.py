"""`metaproxy webhook`: serve the sidecar-injection admission webhook.

The same process shape as the sidecar's (`metaproxy.process.serve`): a frozen `WebhookConfig`
from flags and `METAPROXY_*` variables, then `serve(Webhook(config))` — SIGTERM/SIGINT drain,
SIGHUP reloads the certificate cert-manager rotates.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from metaproxy.process.servercmd import register_process
from metaproxy.webhook.config import WebhookConfig

if TYPE_CHECKING:
    from metaproxy.webhook.process import Webhook


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_process(
        subparsers,
        "webhook",
        "mutating admission webhook that injects the sidecar into labelled pods",
        WebhookConfig,
        _root,
        description="Serve POST /mutate (AdmissionReview v1) and GET /healthz. Pods labelled or "
        'annotated metaproxy.io/inject: "true" get the metaproxy sidecar.',
    )


def _root(config: WebhookConfig) -> Webhook:
    from metaproxy.webhook.process import Webhook

    return Webhook(config)
