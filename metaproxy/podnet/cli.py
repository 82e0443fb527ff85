"""`metaproxy link-local setup|check`: the init-container way to the metadata addresses.

For clusters that cannot add the CNI plugin: an init container of the pod runs `setup` in the
pod's own network namespace before the sidecar starts. It runs as uid 0 with the NET_ADMIN
capability and no other (iptables-nft needs no more; docs/link-local.md), and needs the
`iptables` binaries in its image. Exit 0 when the namespace is ready, 1 with one line saying
what is not.

`install-cni`, `uninstall-cni` and `check-install` are the other way: they put the CNI plugin on
a node from a DaemonSet, and keep it there (`metaproxy.podnet.install`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy.clihelp import add_flag
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, MAX_PORT

if TYPE_CHECKING:
    from metaproxy.podnet.install import Installer

# install-cni's defaults: the node's dirs where the DaemonSet mounts them.
BIN_DIR = Path("/host/opt/cni/bin")
CONF_DIR = Path("/host/etc/cni/net.d")
PYTHON = "/usr/bin/env python3"
READY_FILE = Path("/tmp/ready")  # noqa: S108 - the DaemonSet's own emptyDir
INTERVAL_SECONDS = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "link-local",
        help="put the metadata addresses in this pod's network namespace (init container)",
    )
    commands = parser.add_subparsers(dest="link_local_command", required=True, metavar="ACTION")
    setup = commands.add_parser(
        "setup",
        help="add the metadata addresses to lo and redirect them to the sidecar, then check",
        description="Needs NET_ADMIN and the iptables binaries: adds the addresses to lo and "
        "redirects their port 80 to the sidecar's loopback ports in the nat table.",
    )
    _flags(setup)
    setup.set_defaults(func=_setup)
    check = commands.add_parser(
        "check",
        help="report whether this network namespace is ready for the sidecar",
        description="Needs NET_ADMIN: iptables reads the nat table over netlink.",
    )
    _flags(check)
    check.set_defaults(func=_check)
    _register_node_commands(commands)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to {MAX_PORT})")
    return value


def _flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--imds-port",
        type=_port,
        default=IMDS_PORT,
        metavar="PORT",
        allowed=f"a TCP port, 1 to {MAX_PORT}",
        help="the sidecar's IMDS port on 127.0.0.1 and ::1, where 169.254.169.254:80 and "
        "[fd00:ec2::254]:80 are redirected",
    )
    add_flag(
        parser,
        "--container-port",
        type=_port,
        default=CONTAINER_PORT,
        metavar="PORT",
        allowed=f"a TCP port, 1 to {MAX_PORT}",
        help="the sidecar's container-credentials port on 127.0.0.1 and ::1, where "
        "169.254.170.2:80, 169.254.170.23:80 and [fd00:ec2::23]:80 are redirected",
    )
    add_flag(
        parser,
        "--node-metadata",
        action="store_true",
        help="also let the sidecar reach the node's IMDS through the pod's uplink (the "
        "interface of the default route): accept_local=1 on it",
    )


def _uplink(args: argparse.Namespace) -> str | None:
    from metaproxy.podnet.addresses import default_route_interface

    if not args.node_metadata:
        return None
    uplink = default_route_interface()
    if uplink is None:
        raise OSError(errno.ENETUNREACH, "--node-metadata: no IPv4 default route, so no uplink")
    return uplink


def _setup(args: argparse.Namespace) -> int:
    from metaproxy.podnet import addresses

    ports = {"imds_port": args.imds_port, "container_port": args.container_port}
    try:
        uplink = _uplink(args)
        done = addresses.prepare(uplink=uplink, **ports)
        problems = addresses.check(uplink=uplink, **ports)
    except OSError as exc:
        return _report(args, False, _explain(exc))
    if problems:
        return _report(args, False, f"{done.summary()}; not ready: " + "; ".join(problems))
    return _report(args, True, done.summary())


def _check(args: argparse.Namespace) -> int:
    from metaproxy.podnet import addresses

    ports = {"imds_port": args.imds_port, "container_port": args.container_port}
    try:
        problems = addresses.check(uplink=_uplink(args), **ports)
    except OSError as exc:
        return _report(args, False, _explain(exc))
    if problems:
        return _report(args, False, "not ready: " + "; ".join(problems))
    rules = addresses.redirects(addresses.task_addresses(), **ports)
    return _report(args, True, "ready: " + ", ".join(map(str, rules)))


def _explain(exc: OSError) -> str:
    text = str(exc.strerror or exc) if not exc.filename else f"{exc.filename}: {exc.strerror}"
    if exc.errno == errno.EPERM:
        text += " (the init container needs the NET_ADMIN capability)"
    return text


def _report(args: argparse.Namespace, ok: bool, line: str) -> int:
    print(f"{args.command_prog}: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


# --- the node's CNI plugin: install-cni, uninstall-cni, check-install ---------------------------


def _register_node_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    install = commands.add_parser(
        "install-cni",
        help="install the CNI plugin on this node and keep it chained (the DaemonSet)",
        description="Writes the plugin into the node's CNI bin dir, appends it to the node's "
        "primary network configuration, and checks both again every --interval seconds until "
        "SIGTERM. Runs as root with no capability; needs the node's dirs mounted read-write.",
    )
    _dirs(install)
    add_flag(
        install,
        "--python",
        type=_interpreter,
        default=PYTHON,
        metavar="INTERPRETER",
        allowed="an absolute path, optionally with one argument (a #! line)",
        help="the node's Python 3.11 or later, which runs the plugin",
    )
    add_flag(
        install,
        "--node-metadata",
        action="store_true",
        help="\"nodeMetadata\": true in the plugin's entry: the sidecar may reach the node's "
        "IMDS through the pod's interface (for the webhook's --node-metadata paths)",
    )
    for flag, default, what in (
        ("--imds-port", IMDS_PORT, "IMDS"),
        ("--container-port", CONTAINER_PORT, "container-credentials"),
    ):
        add_flag(
            install,
            flag,
            type=_port,
            default=default,
            metavar="PORT",
            allowed=f"a TCP port, 1 to {MAX_PORT}",
            help=f"the sidecar's {what} port, written into the entry when not the default",
        )
    add_flag(
        install,
        "--interval",
        type=_seconds,
        default=INTERVAL_SECONDS,
        unit="seconds",
        metavar="SECONDS",
        allowed="more than 0",
        help="how often to check the binary and the entry again, and repair them",
    )
    _ready_file(install, "the file that exists while the plugin is installed")
    add_flag(
        install,
        "--uninstall-on-exit",
        action="store_true",
        help="on SIGTERM, remove the entry and the binary (pods created meanwhile get no "
        "link-local addresses)",
    )
    add_flag(
        install,
        "--once",
        action="store_true",
        help="one pass, then exit: 0 when installed, 1 when not",
    )
    install.set_defaults(func=_install_cni)

    uninstall = commands.add_parser(
        "uninstall-cni",
        help="remove the CNI plugin's entry from the node's configuration, then its binary",
    )
    _dirs(uninstall)
    uninstall.set_defaults(func=_uninstall_cni)

    check = commands.add_parser(
        "check-install",
        help="exit 0 when install-cni has the plugin in place (the DaemonSet's readiness probe)",
    )
    _ready_file(check, "the file install-cni keeps while the plugin is installed")
    check.set_defaults(func=_check_install)


def _dirs(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--cni-bin-dir",
        type=Path,
        default=BIN_DIR,
        metavar="DIR",
        help="the node's CNI bin dir (containerd's /opt/cni/bin, mounted), where the plugin "
        "is the file `metaproxy`",
    )
    add_flag(
        parser,
        "--cni-conf-dir",
        type=Path,
        default=CONF_DIR,
        metavar="DIR",
        help="the node's CNI configuration dir (/etc/cni/net.d, mounted); its first "
        "*.conflist, *.conf or *.json by name is the one the runtime uses",
    )


def _ready_file(parser: argparse.ArgumentParser, meaning: str) -> None:
    add_flag(parser, "--ready-file", type=Path, default=READY_FILE, metavar="PATH", help=meaning)


def _interpreter(text: str) -> str:
    from metaproxy.podnet.plugin_archive import shebang_problem

    problem = shebang_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text[:80]!r} {problem}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _writable(path: Path, flag: str) -> Path:
    from metaproxy.errors import StartError

    if not path.is_dir():
        raise StartError(f"{flag} {path}: no such directory (is the host path mounted?)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartError(f"{flag} {path}: not writable (mount it read-write; run as root)")
    return path


def _installer(args: argparse.Namespace) -> Installer:
    from metaproxy.logs import setup_logging
    from metaproxy.podnet.install import Installer, Settings

    settings = Settings(
        bin_dir=_writable(args.cni_bin_dir, "--cni-bin-dir"),
        conf_dir=_writable(args.cni_conf_dir, "--cni-conf-dir"),
        python=getattr(args, "python", PYTHON),
        node_metadata=getattr(args, "node_metadata", False),
        imds_port=getattr(args, "imds_port", IMDS_PORT),
        container_port=getattr(args, "container_port", CONTAINER_PORT),
    )
    setup_logging()
    return Installer(settings)


def _install_cni(args: argparse.Namespace) -> int:
    from metaproxy.podnet.install_watch import watch

    installer = _installer(args)
    if args.once:
        return 0 if installer.once() else 1
    return watch(
        installer,
        interval=args.interval,
        ready_file=args.ready_file,
        uninstall_on_exit=args.uninstall_on_exit,
    )


def _uninstall_cni(args: argparse.Namespace) -> int:
    _installer(args).uninstall()
    return 0


def _check_install(args: argparse.Namespace) -> int:
    try:
        state = args.ready_file.read_text().strip()
    except FileNotFoundError:
        return _report(args, False, f"not ready: no {args.ready_file} (install-cni is not done)")
    return _report(args, True, f"ready: {state}")
