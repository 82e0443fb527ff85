"""`metaproxy` command line. Each subsystem registers its own subcommands.

Registration modules import nothing heavy at top level: `metaproxy sidecar` must start fast and
must never import boto3, so the work behind each command is imported when the command runs.

Exit status: 0 done, 1 a run-time failure (a port in use, a missing or unreadable file, a refused
request), 2 a usage mistake (a bad flag, value or combination). Ordinary mistakes are one line on
stderr naming the flag or file, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from metaproxy.clihelp import walk

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

USAGE = 2
FAILED = 1


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("metaproxy")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaproxy",
        description="Secure multi-tenant metadata and credential proxy for container platforms.",
    )
    parser.add_argument("--version", action="version", version=f"metaproxy {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a subsystem not built into this installation
        module.register(sub)
    for command in walk(parser):
        # The innermost parser's default wins: errors name `metaproxy identity issue`.
        command.set_defaults(command_prog=command.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from metaproxy.errors import ConfigError, StartError

    command = "metaproxy"
    try:
        args = build_parser().parse_args(argv)  # `--help | head` can break the pipe too
        command = args.command_prog
        status: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except ConfigError as exc:
        print(f"{command}: {exc.detail}", file=sys.stderr)
        return USAGE
    except StartError as exc:
        print(f"{command}: {exc.detail}", file=sys.stderr)
        return FAILED
    except BrokenPipeError:
        # `metaproxy audit query ... | head`: the reader is gone, which is not an error to
        # report. Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return 130
    return status
