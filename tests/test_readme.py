"""The README's commands are run as written, taken from the README itself, so they cannot drift."""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metaproxy.cli import build_parser
from tests.support import REPO, cannot_run, clean_aws_env

README = REPO / "README.md"
PACKAGE = REPO / "metaproxy"
LAYOUT = re.compile(r"## Layout\n.*?```\n(.*?)```", re.S)
BLOCK = re.compile(r"<!-- readme-test: begin -->\n```sh\n(.*?)```\n<!-- readme-test: end -->", re.S)
# The fixed loopback ports the README's production-shaped run uses.
README_PORTS = (5000, 8443, 9902, 8181, 8182, 9901)


def readme_script() -> str:
    scripts: list[str] = BLOCK.findall(README.read_text())
    assert len(scripts) == 1, "README.md has one readme-test block"
    return scripts[0]


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(180)
def test_running_it_for_real_works_as_written(tmp_path: Path) -> None:
    """Keys, certificates, policies, the local STS, a broker and a sidecar from the README's
    commands; the AWS CLI gets the task's role through both endpoints; the audit log verifies."""
    busy = [port for port in README_PORTS if _port_in_use(port)]
    if busy:
        cannot_run(f"ports the README uses are busy on this machine: {busy}")
    shutil.copytree(REPO / "policies", tmp_path / "policies")  # as in a clone
    bin_dir = Path(sys.executable).parent
    env = clean_aws_env(PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    # The harness, not the README: stop on the first failing command, and never leave a
    # background server behind when one does.
    harness = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    result = subprocess.run(
        ["bash", "-c", harness + readme_script()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text()[-2000:]}"
        for log in sorted((tmp_path / "metaproxy-real" / "run").glob("*.log"))
    )
    assert result.returncode == 0, result.stdout + result.stderr + logs
    out = result.stdout
    assert out.count("assumed-role/acme-app/acme.web-1") == 2, out
    assert '"taskId" : "web-1"' in out, out  # the instance-identity document is signed and served
    assert "OK:" in out and "checkpoints (signed)" in out, out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_metaproxy_command_in_the_readme_exists() -> None:
    """Each `metaproxy COMMAND [SUBCOMMAND]` the README names is one the CLI has."""
    commands = _subcommands(build_parser())
    named = re.findall(r"\bmetaproxy ([a-z][a-z-]+)(?: ([a-z][a-z-]+))?", README.read_text())
    assert named
    for command, sub in named:
        assert command in commands, f"README names `metaproxy {command}`, which does not exist"
        nested = _subcommands(commands[command])
        if nested and sub:
            assert sub in nested, f"README names `metaproxy {command} {sub}`"


def layout_names() -> set[str]:
    """The modules the README's layout names, dotted under metaproxy (`audit.writer`, `config`):
    `pkg/  a, b (a note), c` lines and their continuations, and top-level `name.py`s."""
    found = LAYOUT.search(README.read_text())
    assert found, "README.md has a Layout section with a code block"
    names: set[str] = set()
    package = ""
    for line in found.group(1).splitlines()[1:]:  # after `metaproxy/`
        if not line.startswith("  "):
            break  # `policies/ tests/ …` stand beside the package
        text = re.sub(r"\([^)]*\)", "", line)
        if head := re.match(r"\s+([a-z_/]+)/\s+(.*)", text):
            package, text = head.group(1).replace("/", "."), head.group(2)
        for token in re.findall(r"[A-Za-z_]\w*(?:\.py)?", text):
            names.add(token[:-3] if token.endswith(".py") else f"{package}.{token}")
    return names


def test_the_layout_names_every_module_and_nothing_else() -> None:
    """The README's layout names each module of metaproxy/ under its package, and none that
    is gone."""
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    named = layout_names()
    assert (sorted(modules - named), sorted(named - modules)) == ([], [])
