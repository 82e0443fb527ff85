"""How every flag explains itself: its meaning, unit, allowed values, default (or that it is
required) and, for the servers' settings, its environment variable — one sentence format for
`--help` and docs/configuration.md.

The servers' flags get theirs from the config dataclasses' `doc(...)` (metaproxy.config). Every
other command adds its flags with `add_flag`, which reads the default, the choices and
`required` from the argparse action itself, so a help text cannot state a default or a set of
values the flag does not have. tests/test_cli_help.py walks the whole command tree.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal

Unit = Literal[
    "seconds",
    "days",
    "bytes",
    "count",
    "records",
    "per second",
    "fraction",
    "connections",
    "requests",
]


def show_value(value: object) -> str:
    """A default as help text shows it: `unset` for nothing, `off` for a switch not given."""
    if value is None or value in ("", ()):
        return "unset"
    if value is False or value is True:
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def help_text(
    meaning: str,
    *,
    unit: str = "",
    allowed: str = "",
    default: str = "",
    required: bool = False,
    env: str = "",
) -> str:
    """`meaning. Unit: seconds. Allowed: a, b. Default: 10.0. Env: METAPROXY_X.` (plain text;
    `for_argparse` escapes it for argparse)."""
    parts = [meaning + "."]
    if unit:
        parts.append(f"Unit: {unit}.")
    if allowed:
        parts.append(f"Allowed: {allowed}.")
    if required:
        parts.append("Required.")
    elif default:
        parts.append(f"Default: {default}.")
    if env:
        parts.append(f"Env: {env}.")
    return " ".join(parts)


def for_argparse(text: str) -> str:
    """argparse %-formats help strings."""
    return text.replace("%", "%%")


def add_flag(
    parser: argparse._ActionsContainer,
    *names: str,
    help: str,
    unit: Unit | None = None,
    allowed: str = "",
    **kwargs: Any,
) -> argparse.Action:
    """`parser.add_argument(*names, **kwargs)` with the help sentence built from `help` (the
    meaning), `unit`, the action's choices (or `allowed`, describing a free-form set), and its
    default or `required`. Positional arguments state their meaning and allowed values only."""
    action = parser.add_argument(*names, **kwargs)
    choices = ", ".join(map(str, action.choices)) if action.choices else ""
    option = bool(action.option_strings)
    action.help = for_argparse(
        help_text(
            help,
            unit=unit or "",
            allowed=choices or allowed,
            default=show_value(action.default) if option else "",
            required=option and action.required,
        )
    )
    return action


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An action's help as `--help` prints it (%(default)s and friends filled in), unwrapped."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width found without `shutil`: argparse imports `shutil`
    (and with it `bz2`, `lzma` and `fnmatch`) for that whenever a parser is built, which is half
    a megabyte of every sidecar that never prints its help."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = terminal_columns() - 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)


def terminal_columns() -> int:
    """`shutil.get_terminal_size().columns`: $COLUMNS, else the terminal's, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (AttributeError, ValueError, OSError):
        return 80
