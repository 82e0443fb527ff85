"""The README's commands are run as written, taken from the README itself, so they cannot drift."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from metaproxy.cli import build_parser
from tests.conftest import require_redis_server
from tests.support import REPO, cannot_run, clean_aws_env

README = REPO / "README.md"
PACKAGE = REPO / "metaproxy"
LAYOUT = re.compile(r"## Layout\n.*?```\n(.*?)```", re.S)
BLOCK = re.compile(r"<!-- readme-test: begin -->\n```sh\n(.*?)```\n<!-- readme-test: end -->", re.S)
PORT = re.compile(r"\b([A-Z_]+_PORT)=(\d+)")
# Stopped and waited for, so the next run finds the ports free.
HARNESS = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n"
WAIT_LIMIT = 30.0  # seconds: every wait in the block, and so a failing run


def readme_script() -> str:
    scripts: list[str] = BLOCK.findall(README.read_text())
    assert len(scripts) == 1, "README.md has one readme-test block"
    return scripts[0]


def readme_ports() -> dict[str, int]:
    """The fixed loopback ports the README's production-shaped run uses, by variable."""
    return {name: int(port) for name, port in PORT.findall(readme_script())}


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Run:
    returncode: int
    out: str
    err: str
    seconds: float
    logs: str


def run_readme(cwd: Path, *, held: int = 0) -> Run:
    """The README's block under `bash -euo pipefail` in `cwd`, a clone's root (the harness,
    not the README, kills what it left running when it stops); `held`: a port the test holds."""
    busy = [port for port in readme_ports().values() if port != held and _port_in_use(port)]
    if busy:
        cannot_run(f"ports the README uses are busy on this machine: {busy}")
    require_redis_server()
    bin_dir = Path(sys.executable).parent
    env = clean_aws_env(PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", HARNESS + readme_script()],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    seconds = time.monotonic() - started
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text()[-2000:]}"
        for log in sorted((cwd / "metaproxy-real" / "run").glob("*.log"))
    )
    return Run(result.returncode, result.stdout, result.stderr, seconds, logs)


# The block's ports are fixed, host-wide: two runs at once would take each other's. A test that
# runs it holds this lock (on any xdist worker, or in another checkout's run on this machine).
PORTS_LOCK = Path(tempfile.gettempdir()) / "metaproxy-readme-ports.lock"


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    """What the block needs of a clone: the sample policies; and the README's ports to itself."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    with PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp_path


@pytest.mark.slow  # started first: see tests/conftest.py
@pytest.mark.timeout(360)
def test_running_it_for_real_works_as_written_and_a_second_run_keeps_the_keys(
    clone: Path,
) -> None:
    """Keys, certificates, policies, the local STS and S3, Valkey, a broker with its control
    API and S3 shipping, and a sidecar from the README's commands; the AWS CLI gets the task's
    role through both endpoints; an operator's revoke is audited under her name; the local log
    and its S3 copy verify, with port 5000 taken as macOS's AirPlay takes it. Run again, it
    refuses before touching the keys."""
    with contextlib.ExitStack() as held:
        airplay = held.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # taken already: all the better
            airplay.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            airplay.bind(("127.0.0.1", 5000))
            airplay.listen()
        run = run_readme(clone)
    assert run.returncode == 0, run.out + run.err + run.logs
    out = run.out
    assert out.count("assumed-role/acme-app/acme.web-1") == 2, out
    assert '"taskId" : "web-1"' in out, out  # the instance-identity document is signed and served
    assert out.count("checkpoints (signed)") == 2, out  # the local log, and its copy in S3
    assert "OK: 1 replicas" in out, out  # the S3 copy: one chain under prefix/<instance>/
    revoked = [json.loads(line) for line in out.splitlines() if '"event": "revoked"' in line]
    assert [(r["operator"], r["task"]) for r in revoked] == [("alice", "web-2")], out

    keys = {path: path.read_bytes() for path in (clone / "metaproxy-real" / "keys").iterdir()}
    again = run_readme(clone)
    assert again.returncode != 0
    assert "metaproxy-real exists: refusing to overwrite its keys" in again.err, again.err
    assert {path: path.read_bytes() for path in keys} == keys


@pytest.mark.timeout(120)
def test_a_taken_port_stops_the_run_within_30_s_printing_the_failing_log_line(
    clone: Path,
) -> None:
    """The broker's port held by someone else: the run stops within 30 s and prints the
    broker's own line saying so, not a silent wait."""
    port = readme_ports()["BROKER_PORT"]
    with socket.socket() as taken:
        # A run just before (the test above) leaves connections to the port in TIME_WAIT.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = run_readme(clone, held=port)
    assert run.returncode != 0
    assert run.seconds < WAIT_LIMIT, run.seconds
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in run.err, run.err
    assert "broker.log" in run.err, run.err


@pytest.mark.timeout(120)
def test_a_broken_policy_stops_the_run_within_30_s_printing_the_problem(clone: Path) -> None:
    """A policy cut short: `metaproxy policy check`, before any server starts, stops the run
    within 30 s on the line naming the file and the problem."""
    policy = clone / "policies" / "acme.toml"
    policy.write_text(policy.read_text().replace("# end of policy", ""))
    run = run_readme(clone)
    assert run.returncode != 0
    assert run.seconds < WAIT_LIMIT, run.seconds
    assert "metaproxy-real/policies/acme.toml" in run.out, run.out + run.err
    assert "never loaded" in run.out, run.out
    assert not (clone / "metaproxy-real" / "run" / "broker.log").exists()


def test_the_working_directory_is_ignored_by_git() -> None:
    """`metaproxy-real/` (private keys among it) is never offered to a commit."""
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "metaproxy-real/keys/identity.key"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.returncode == 0, ignored.stderr


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
