"""`metaproxy netns attach|detach`: a task's sidecar inside the task's own network namespace.

The platform creates the namespace (`ip netns add NAME`); `attach` puts the IMDS and
container-credentials addresses on the namespace's loopback, redirects their port 80 to the
sidecar's loopback ports with NAT (`podnet.addresses`, the same code as the CNI plugin and
`metaproxy link-local`) and starts the sidecar in it, so an unconfigured SDK in the task finds
169.254.169.254 with no environment at all, and the task keeps port 80 for itself. The
sidecar's admin endpoint is a Unix socket on the host's file system (`task_files.py`), so the
platform polls `/readyz` from the host. `detach` stops the sidecar (if it still runs,
`task_sidecar.py`) and removes what `attach` added. The ordering is in docs/netns.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from metaproxy.clihelp import add_flag
from metaproxy.errors import ConfigError
from metaproxy.podnet.task_files import (
    DEFAULT_RUNTIME_DIR,
    NETNS_DIR,
    TaskPaths,
    running_sidecar,
    write_state,
)
from metaproxy.podnet.task_sidecar import sidecar_command, stop_sidecar, wait_ready

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Listen addresses and the ready file are what make a sidecar "attached"; letting the caller
# change them would silently break the SDK's defaults or the host's readiness probe.
OWNED_SIDECAR_FLAGS = ("--imds-listen", "--container-listen", "--admin-listen", "--ready-file")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
MAX_WAIT_SECONDS = 3600


class NetnsError(Exception):
    """Attaching or detaching failed; the message is for the operator and holds no secrets."""


def validate_name(name: str) -> str:
    """A namespace name becomes a path under /run/netns: no separators, no `.` or `..`."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--netns {name!r} must match {NAME_PATTERN.pattern} and not be . or ..")
    return name


def validate_sidecar_args(sidecar_args: list[str]) -> list[str]:
    """Refuse what attach sets. (attach's own values also come last, and argparse keeps the last,
    so an abbreviated flag cannot override them either.)"""
    for arg in sidecar_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_SIDECAR_FLAGS:
            raise ConfigError(f"{flag} is set by netns attach; do not pass it after --")
        if arg == "--":
            raise ConfigError("only one -- is allowed: the sidecar takes no positional arguments")
    return sidecar_args


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and {MAX_WAIT_SECONDS} seconds")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("netns", help="run a task's sidecar in its network namespace")
    commands = parser.add_subparsers(dest="netns_command", required=True, metavar="ACTION")
    attach = commands.add_parser(
        "attach",
        help="add the metadata addresses to a namespace and start its sidecar there",
        description="Arguments after -- are passed to `metaproxy sidecar`.",
    )
    _common_arguments(attach)
    add_flag(
        attach,
        "--wait-ready",
        action="store_true",
        help="start the sidecar in the background and return once its /readyz is true; "
        "off: run it in the foreground",
    )
    add_flag(
        attach,
        "--ready-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        unit="seconds",
        allowed=f"more than 0, at most {MAX_WAIT_SECONDS}",
        help="with --wait-ready: how long to wait for /readyz before failing",
    )
    add_flag(
        attach,
        "sidecar_args",
        nargs="*",
        metavar="-- SIDECAR_ARGS",
        help="flags for `metaproxy sidecar` (not " + ", ".join(OWNED_SIDECAR_FLAGS) + ")",
    )
    attach.set_defaults(func=_attach)
    detach = commands.add_parser(
        "detach", help="stop the namespace's sidecar if running and remove its addresses"
    )
    _common_arguments(detach)
    add_flag(
        detach,
        "--stop-timeout",
        type=_seconds,
        default=20.0,
        metavar="SECONDS",
        unit="seconds",
        allowed=f"more than 0, at most {MAX_WAIT_SECONDS}",
        help="how long the sidecar may drain after SIGTERM before it gets SIGKILL",
    )
    detach.set_defaults(func=_detach)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--netns",
        required=True,
        metavar="NAME",
        allowed="letters, digits, _ . - (at most 64)",
        help="the task's network namespace, as named by `ip netns add`",
    )
    add_flag(
        parser,
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        metavar="DIR",
        help="host directory for NAME/admin.sock and the sidecar's state",
    )


def _attach(args: argparse.Namespace) -> int:
    return _reporting_errors("attach", _run_attach, args)


def _detach(args: argparse.Namespace) -> int:
    return _reporting_errors("detach", _run_detach, args)


def _reporting_errors(
    action: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    try:
        return run(args)
    except NetnsError as exc:
        print(f"metaproxy netns {action}: {exc}", file=sys.stderr)
        return 1


def _preflight(args: argparse.Namespace) -> tuple[str, TaskPaths]:
    name = validate_name(args.netns)
    paths = TaskPaths.for_namespace(args.runtime_dir.absolute(), name)
    if len(str(paths.admin_socket)) > UNIX_PATH_MAX:
        raise ConfigError(f"--runtime-dir is too long for a Unix socket path: {paths.admin_socket}")
    if os.geteuid() != 0:
        raise NetnsError("needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN on the host): run as root")
    # nsenter starts the sidecar in the namespace; the addresses need no tool, and `prepare`
    # resolves the redirect's iptables binaries itself before it changes anything.
    _tool("nsenter")
    return name, paths


def _tool(name: str) -> str:
    """Absolute path of a system tool, resolved before anything changes, with a clear error."""
    path = shutil.which(name, path=os.environ.get("PATH", os.defpath))
    if path is None:
        raise NetnsError(f"{name} not found on PATH (install util-linux)")
    return path


def _run_attach(args: argparse.Namespace) -> int:
    sidecar_args = validate_sidecar_args(list(args.sidecar_args))
    name, paths = _preflight(args)
    if not (NETNS_DIR / name).exists():
        raise NetnsError(f"no network namespace {name!r} (create it with `ip netns add {name}`)")
    if running_sidecar(paths) is not None:
        raise NetnsError(f"a sidecar is already attached to {name!r}; detach it first")
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.ready_file.unlink(missing_ok=True)
    ipv6 = add_task_addresses(name)
    command = sidecar_command(_tool("nsenter"), name, paths, sidecar_args, ipv6=ipv6)
    if not args.wait_ready:
        # Foreground: this process becomes the sidecar (nsenter execs without forking), so a
        # supervisor's SIGTERM reaches the sidecar itself and starts its drain.
        write_state(paths, os.getpid(), name)
        sys.stdout.flush()
        os.execv(command[0], command)  # noqa: S606 - fixed program, validated arguments
    with paths.log_file.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - nsenter and our own interpreter
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this command, which returns once ready
        )
    write_state(paths, process.pid, name)
    ready, detail = wait_ready(paths.admin_socket, process, args.ready_timeout)
    if not ready:
        # A half-started sidecar must not linger: the platform will not start the task anyway.
        release(name, paths, stop_timeout=5.0)
        raise NetnsError(f"sidecar in {name!r} not ready: {detail} (log: {paths.log_file})")
    print(json.dumps({"netns": name, "pid": process.pid, "admin": f"unix:{paths.admin_socket}"}))
    process.returncode = 0  # detached on purpose: no "still running" warning on exit
    return 0


def _run_detach(args: argparse.Namespace) -> int:
    name, paths = _preflight(args)
    stopped = release(name, paths, stop_timeout=args.stop_timeout)
    print(json.dumps({"netns": name, "stopped_pid": stopped}))
    return 0


def release(name: str, paths: TaskPaths, stop_timeout: float) -> int | None:
    """Undo attach: stop the sidecar if it still runs, remove the redirect, the addresses and
    our files.

    Idempotent, and fine after the namespace is gone (then its addresses went with it). The log
    stays, for whoever investigates why the task stopped.
    """
    stopped = stop_sidecar(paths, timeout=stop_timeout)
    remove_task_addresses(name)
    for path in (paths.state_file, paths.pid_file, paths.ready_file, paths.admin_socket):
        path.unlink(missing_ok=True)
    return stopped


def add_task_addresses(name: str) -> bool:
    """`lo` up with the task addresses and their redirect to `IMDS_PORT` and `CONTAINER_PORT`;
    True if they include IPv6 (the namespace has it)."""
    from metaproxy.podnet import addresses

    try:
        prepared = addresses.prepare(NETNS_DIR / name)
    except OSError as exc:
        raise NetnsError(f"adding the addresses and redirect to {name!r}: {exc}") from None
    return any(address.version == 6 for address in prepared.addresses)


def remove_task_addresses(name: str) -> None:
    from metaproxy.podnet import addresses

    try:
        addresses.release(NETNS_DIR / name)  # `lo` stays up: a down `lo` breaks the task
    except OSError as exc:
        raise NetnsError(f"removing the addresses and redirect from {name!r}: {exc}") from None
