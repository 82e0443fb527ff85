"""The sidecar process of a task's namespace: the command that starts it there, waiting until
it is ready, and stopping it (SIGTERM, so it drains, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT
from metaproxy.podnet.admin_socket import probe_ready
from metaproxy.podnet.task_files import NETNS_DIR, TaskPaths, running_sidecar

POLL_SECONDS = 0.1


def sidecar_command(
    nsenter: str, name: str, paths: TaskPaths, sidecar_args: list[str], *, ipv6: bool
) -> list[str]:
    """`nsenter --net=… python -m metaproxy sidecar …` on the loopback ports the namespace's
    redirect sends the SDKs' default addresses to (127.0.0.1, and ::1 where the namespace has
    IPv6): IMDS on `IMDS_PORT`, container credentials on `CONTAINER_PORT`. Never port 80: the
    task's own `0.0.0.0:80` must stay free."""
    hosts = ["127.0.0.1", "[::1]"] if ipv6 else ["127.0.0.1"]
    imds = [f"{host}:{IMDS_PORT}" for host in hosts]
    container = [f"{host}:{CONTAINER_PORT}" for host in hosts]
    return [
        nsenter,
        f"--net={NETNS_DIR / name}",
        "--",
        sys.executable,
        "-m",
        "metaproxy",
        "sidecar",
        *sidecar_args,
        f"--imds-listen={','.join(imds)}",
        f"--container-listen={','.join(container)}",
        f"--admin-listen=unix:{paths.admin_socket}",
        f"--ready-file={paths.ready_file}",
    ]


def stop_sidecar(paths: TaskPaths, timeout: float) -> int | None:
    """SIGTERM (the sidecar drains), SIGKILL after `timeout`. Returns the pid it stopped."""
    pid = running_sidecar(paths)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(POLL_SECONDS)
    return pid


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child (attach's rollback); otherwise it is reparented elsewhere.
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; its parent just has not reaped it


def wait_ready(
    admin_socket: Path, process: subprocess.Popen[bytes], timeout: float
) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    detail = "not started"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False, f"sidecar exited with status {process.returncode}"
        ready, detail = probe_ready(admin_socket)
        if ready:
            return True, detail
        time.sleep(POLL_SECONDS)
    return False, f"timed out after {timeout:g}s, last /readyz: {detail}"
