"""The command every long-running process shares (`metaproxy sidecar`, `metaproxy webhook`,
`metaproxy broker`): its config flags and `--ready-file`; flags and environment built into the
frozen config; then `serve(root)` (`metaproxy.process.serve`). Ordinary mistakes end as one line
naming the flag (see `metaproxy.cli.main`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from metaproxy.clihelp import HelpFormatter, add_flag
from metaproxy.config import C, add_config_arguments
from metaproxy.process.serve import Root


def register_process(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    config_class: type[C],
    root: Callable[[C], Root],
    *,
    description: str | None = None,
) -> None:
    """`metaproxy NAME`: build the config, then `serve(root(config))`."""

    def run_command(config: C, ready_file: Path | None) -> int:
        from metaproxy.process.serve import serve

        return serve(root(config), ready_file=ready_file)

    _add_command(subparsers, name, help_text, config_class, run_command, description=description)


def _add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    config_class: type[C],
    run: Callable[[C, Path | None], int],
    *,
    description: str | None,
) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=description or help_text,
        formatter_class=HelpFormatter,
    )
    add_config_arguments(parser, config_class)
    add_flag(
        parser,
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write the bound URLs and the pid here (JSON) once listening",
    )

    def run_command(args: argparse.Namespace) -> int:
        from metaproxy.config import build_config

        return run(build_config(config_class, args), args.ready_file)

    parser.set_defaults(func=run_command)
