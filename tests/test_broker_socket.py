"""The broker's Unix socket reaches sidecars of another user: the image's sidecar runs as uid
10001, and a root broker's umask left the socket `root:root 0755`, which refused its connect
(the pods trial of 2026-12-05). `--socket-mode` and `--socket-group` set it whatever the umask."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from metaproxy.broker.config import BrokerConfig
from metaproxy.broker.server import BrokerServer
from metaproxy.config import build_config
from metaproxy.errors import ConfigError
from tests.support import Pki, broker_config, cannot_run

SIDECAR_UID = 10001  # the image's user (Dockerfile)

# Connects to the socket as the user the test runs it as, and says how it went.
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


def connect_as(uid: int, path: Path) -> str:
    # The system's interpreter: the test's own may live under /root, which uid 10001 cannot read.
    python = shutil.which("python3", path="/usr/bin:/bin") or cannot_run("no /usr/bin/python3")
    result = subprocess.run(
        [python, "-c", CONNECT, str(path)],
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def require_root() -> None:
    if os.geteuid() != 0:
        cannot_run("running a client as another user needs root")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A socket directory the other user can reach: pytest's base temp dir is root's alone."""
    path = Path(tempfile.mkdtemp(prefix="metaproxy-socket-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(
    run_dir: Path, tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path, **extra: str
) -> BrokerServer:
    (run_dir / "broker.sock").unlink(missing_ok=True)
    config = broker_config(
        tmp_path, pki, sts_url, policies_dir, socket=run_dir / "broker.sock", **extra
    )
    return await BrokerServer.start(replace(config, tls_cert=None, tls_key=None))


async def test_a_sidecar_of_the_socket_group_connects_whatever_the_umask(
    run_dir: Path, tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """With root's umask 022, `--socket-group 10001` gives the socket to the sidecar's group
    with mode 0660: uid 10001 connects."""
    require_root()
    old = os.umask(0o022)
    try:
        broker = await start(
            run_dir, tmp_path, pki, sts_url, policies_dir, socket_group=str(SIDECAR_UID)
        )
    finally:
        os.umask(old)
    try:
        assert broker.config.socket is not None
        status = broker.config.socket.stat()
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o660, SIDECAR_UID)
        assert connect_as(SIDECAR_UID, broker.config.socket) == "connected"
    finally:
        await broker.aclose()


async def test_without_the_group_another_user_is_refused_and_the_mode_is_what_was_asked(
    run_dir: Path, tmp_path: Path, pki: Pki, sts_url: str, policies_dir: Path
) -> None:
    """The default 0660 with the broker's own group keeps other users out; `--socket-mode
    0666` (a deliberate choice) lets them in."""
    require_root()
    broker = await start(run_dir, tmp_path, pki, sts_url, policies_dir)
    try:
        assert broker.config.socket is not None
        assert stat.S_IMODE(broker.config.socket.stat().st_mode) == 0o660
        assert connect_as(SIDECAR_UID, broker.config.socket) == "refused"
    finally:
        await broker.aclose()
    broker = await start(run_dir, tmp_path, pki, sts_url, policies_dir, socket_mode="0666")
    try:
        assert broker.config.socket is not None
        assert connect_as(SIDECAR_UID, broker.config.socket) == "connected"
    finally:
        await broker.aclose()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("METAPROXY_SOCKET_MODE", "999", "--socket-mode: '999' is not octal 0000-0777"),
        ("METAPROXY_SOCKET_MODE", "rw-rw----", "--socket-mode: 'rw-rw----' is not octal"),
        ("METAPROXY_SOCKET_GROUP", "no-such-group-here", "--socket-group: no group named"),
    ],
)
def test_a_bad_socket_mode_or_group_is_one_line_naming_the_flag(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(BrokerConfig, None, {"METAPROXY_SOCKET": "/run/broker.sock", variable: value})
