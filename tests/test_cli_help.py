"""Every flag of every command explains itself: a meaning, the default it really has (or that it
is required) and the values it really accepts (see metaproxy/clihelp.py)."""

from __future__ import annotations

import argparse

import pytest

from metaproxy.cli import build_parser
from metaproxy.clihelp import add_flag, expanded_help, show_value, walk

NOT_FLAGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def every_argument() -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    return [
        (parser, action)
        for parser in walk(build_parser())
        for action in parser._actions
        if not isinstance(action, NOT_FLAGS)
    ]


ARGUMENTS = every_argument()


def argument_id(item: tuple[argparse.ArgumentParser, argparse.Action]) -> str:
    parser, action = item
    return f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"


def test_the_walk_reaches_every_command() -> None:
    """The tree walk sees nested commands, so the checks below cover them."""
    progs = {parser.prog for parser in walk(build_parser())}
    for prog in ("metaproxy identity issue", "metaproxy audit query", "metaproxy netns detach",
                 "metaproxy revoke", "metaproxy sts-emulator", "metaproxy broker"):  # fmt: skip
        assert prog in progs
    assert len(ARGUMENTS) > 150


@pytest.mark.parametrize(("parser", "action"), ARGUMENTS, ids=map(argument_id, ARGUMENTS))
def test_every_flag_explains_itself(
    parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    """A meaning; the default it has (or "Required."); every value it accepts."""
    text = " ".join(expanded_help(parser, action).split())
    assert text, "no help"
    if action.option_strings and action.required:
        assert "Required." in text
    elif action.option_strings and action.default not in (None, argparse.SUPPRESS):
        assert f"Default: {show_value(action.default)}." in text
    for choice in action.choices or ():
        assert str(choice) in text, f"{choice!r} is not listed"


@pytest.mark.parametrize("parser", list(walk(build_parser())), ids=lambda p: p.prog)
def test_every_command_says_what_it_does(parser: argparse.ArgumentParser) -> None:
    """Each subcommand has a one-line help in its parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{parser.prog} {choice.dest}"


def test_add_flag_states_what_the_action_has() -> None:
    """Default, unit, choices and required come out as one sentence, as the servers' do."""
    parser = argparse.ArgumentParser()
    ttl = add_flag(parser, "--ttl", type=int, default=3600, unit="seconds", help="how long")
    alg = add_flag(parser, "--alg", choices=("EdDSA", "ES256"), default="EdDSA", help="which")
    key = add_flag(parser, "--key", required=True, help="the key")
    once = add_flag(parser, "--once", action="store_true", help="stop after one")
    pct = add_flag(parser, "--share", type=float, default=0.5, help="50% of it")
    assert expanded_help(parser, ttl) == "how long. Unit: seconds. Default: 3600."
    assert expanded_help(parser, alg) == "which. Allowed: EdDSA, ES256. Default: EdDSA."
    assert expanded_help(parser, key) == "the key. Required."
    assert expanded_help(parser, once) == "stop after one. Default: off."
    assert expanded_help(parser, pct) == "50% of it. Default: 0.5."


def test_errors_name_the_innermost_command(capsys: pytest.CaptureFixture[str]) -> None:
    """A run-time failure of a nested command names the whole command and the flag."""
    from metaproxy.cli import main

    status = main(["identity", "issue", "--key", "/nonexistent/key.pem", "--task", "t",
                   "--tenant", "acme"])  # fmt: skip
    assert status == 1
    assert capsys.readouterr().err == (
        "metaproxy identity issue: --key: /nonexistent/key.pem: No such file or directory\n"
    )


def test_each_command_builds_alone() -> None:
    """`build_parser(command)` registers that command's module only, and the table of commands
    says which module registers each: `metaproxy sidecar` never imports the others."""
    from metaproxy.cli import COMMANDS

    everything = build_parser()
    assert set(COMMANDS) == set(_commands(everything))
    for command, module in COMMANDS.items():
        alone = _commands(build_parser(command))
        assert command in alone
        assert {COMMANDS[name] for name in alone} == {module}


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices)


def test_sidecar_start_imports_no_other_command() -> None:
    """Parsing a sidecar command line imports no other command's module and no
    importlib.metadata (the version is looked up only for --version)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from metaproxy.cli import COMMANDS, build_parser\n"
        "build_parser('sidecar').parse_args(['sidecar', '--broker-url', 'https://b', "
        "'--identity-token-file', '/t'])\n"
        "others = {m for c, m in COMMANDS.items() if c != 'sidecar'}\n"
        "bad = sorted((others | {'importlib.metadata'}) & set(sys.modules))\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
