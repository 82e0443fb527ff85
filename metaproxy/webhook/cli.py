"""`metaproxy webhook`: serve the sidecar-injection admission webhook."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from metaproxy.webhook.patch import DEFAULT_CA_CONFIGMAP, InjectionSettings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "webhook",
        help="mutating admission webhook that injects the sidecar into labelled pods",
        description="Serve POST /mutate (AdmissionReview v1) and GET /healthz. Pods labelled or "
        'annotated metaproxy.io/inject: "true" get the metaproxy sidecar.',
    )
    parser.add_argument("--listen", default="127.0.0.1:9443", help="HOST:PORT to serve on")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    parser.add_argument("--image", required=True, help="the sidecar's container image")
    parser.add_argument(
        "--broker-url", required=True, help="https URL sidecars reach the broker at"
    )
    parser.add_argument(
        "--broker-ca-configmap",
        default=DEFAULT_CA_CONFIGMAP,
        help="ConfigMap (in each pod's namespace) with the broker CA as ca.pem",
    )
    parser.add_argument(
        "--image-pull-policy",
        default="IfNotPresent",
        choices=("Always", "IfNotPresent", "Never"),
    )
    parser.add_argument("--log-format", default="auto", choices=("auto", "json", "text"))
    parser.set_defaults(func=run_webhook)


def settings_from_args(args: argparse.Namespace) -> InjectionSettings:
    from metaproxy.errors import ConfigError

    if not args.image.strip():
        raise ConfigError("--image must name a container image")
    if not args.broker_url.startswith("https://"):
        raise ConfigError("--broker-url must be an https:// URL (sidecars verify the broker CA)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return InjectionSettings(
        image=args.image.strip(),
        broker_url=args.broker_url,
        broker_ca_configmap=args.broker_ca_configmap,
        image_pull_policy=args.image_pull_policy,
    )


def run_webhook(args: argparse.Namespace) -> int:
    from metaproxy.config import split_host_port
    from metaproxy.logs import setup_logging
    from metaproxy.webhook.app import serve

    settings = settings_from_args(args)
    split_host_port(args.listen)  # refuse a bad address before starting anything
    setup_logging(args.log_format)
    return asyncio.run(serve(settings, args.listen, args.tls_cert, args.tls_key))
