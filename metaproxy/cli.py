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

from metaproxy.clihelp import HelpFormatter, walk

# Each command's module exposes `register(subparsers)`, which adds its commands with
# `set_defaults(func=...)`; `func(args) -> int` is the exit status. Keyed by command so that
# `metaproxy sidecar ...` imports and builds the sidecar's parser only: every other command's
# module and flag help cost every sidecar start (tests/test_cli_help.py checks this table
# against what the modules register).
COMMANDS = {
    "sidecar": "metaproxy.sidecar.cli",
    "broker": "metaproxy.broker.cli",
    "identity": "metaproxy.identity.cli",
    "policy": "metaproxy.policy.cli",
    "audit": "metaproxy.audit.cli",
    "certs": "metaproxy.commands.certs",
    "demo": "metaproxy.demo.cli",
    "sts-emulator": "metaproxy.testing.cli",
    "fault-proxy": "metaproxy.testing.cli",
    "netns": "metaproxy.podnet.attach",
    "link-local": "metaproxy.podnet.cli",
    "webhook": "metaproxy.webhook.cli",
    "revoke": "metaproxy.commands.revoke",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))

USAGE = 2
FAILED = 1


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("metaproxy")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


class _VersionAction(argparse._VersionAction):
    """`--version`, looked up only when asked: `importlib.metadata` imports `email`, `zipfile`
    and more, about 30 ms and 0.8 MB of every start otherwise."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        self.version = f"metaproxy {version()}"
        super().__call__(parser, namespace, values, option_string)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or only `command`'s when it is one (what `main` parses)."""
    parser = argparse.ArgumentParser(
        prog="metaproxy",
        description="Secure multi-tenant metadata and credential proxy for container platforms.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a subsystem not built into this installation
        module.register(sub)
    for each in walk(parser):
        # The innermost parser's default wins: errors name `metaproxy identity issue`.
        each.set_defaults(command_prog=each.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from metaproxy.errors import ConfigError, StartError

    command = "metaproxy"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # The first word names the command (the top level has no flags that take a value).
        # `--help | head` can break the pipe too.
        args = build_parser(argv[0] if argv else None).parse_args(argv)
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
