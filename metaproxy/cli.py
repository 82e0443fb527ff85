"""`metaproxy` command line. Each subsystem registers its own subcommands.

Registration modules import nothing heavy at top level: `metaproxy sidecar` must start fast and
must never import boto3, so the work behind each command is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes `register(subparsers)`, which adds its commands with
# `set_defaults(func=...)`; `func(args) -> int` is the exit status.
COMMAND_MODULES = (
    "metaproxy.sidecar.cli",
    "metaproxy.broker.cli",
    "metaproxy.identity.cli",
    "metaproxy.policy.cli",
    "metaproxy.audit.cli",
    "metaproxy.certs",
    "metaproxy.demo.cli",
    "metaproxy.testing.cli",
    "metaproxy.netns",
    "metaproxy.webhook.cli",
    "metaproxy.revoke_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaproxy",
        description="Secure multi-tenant metadata and credential proxy for container platforms.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a subsystem not built into this installation
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from metaproxy.errors import ConfigError

    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"metaproxy {args.command}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
