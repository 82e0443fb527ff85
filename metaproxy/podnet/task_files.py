"""The files `netns attach` keeps on the host for a task's sidecar, and which process they name.

Each namespace gets a directory under the runtime dir: the sidecar's admin socket (sockets are
named by path, not by network namespace, so the platform polls `/readyz` from the host), its
ready file, its log, and the state `detach` trusts: the pid with the process's start time, so
that a recycled pid is never taken for the sidecar.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts named namespaces
DEFAULT_RUNTIME_DIR = Path("/run/metaproxy")


@dataclass(frozen=True, slots=True)
class TaskPaths:
    """Per-namespace files on the host: admin socket, sidecar state, ready file, log."""

    directory: Path

    @classmethod
    def for_namespace(cls, runtime_dir: Path, name: str) -> TaskPaths:
        return cls(runtime_dir / name)

    @property
    def admin_socket(self) -> Path:
        return self.directory / "admin.sock"

    @property
    def state_file(self) -> Path:
        return self.directory / "sidecar.json"

    @property
    def pid_file(self) -> Path:
        """Plain pid, for supervisors (systemd `PIDFile=`); `state_file` is what detach trusts."""
        return self.directory / "sidecar.pid"

    @property
    def ready_file(self) -> Path:
        return self.directory / "ready.json"

    @property
    def log_file(self) -> Path:
        return self.directory / "sidecar.log"


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot when `pid` started: with the pid, it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its closing paren.
    return int(stat.rpartition(")")[2].split()[19])


def write_state(paths: TaskPaths, pid: int, name: str) -> None:
    state = {"pid": pid, "start_time": _start_time(pid), "netns": name}
    tmp = paths.state_file.with_name(paths.state_file.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.chmod(0o600)
    os.replace(tmp, paths.state_file)
    paths.pid_file.write_text(f"{pid}\n")


def running_sidecar(paths: TaskPaths) -> int | None:
    """The attached sidecar's pid if it is still the same process; a recycled pid is not it."""
    try:
        state: dict[str, Any] = json.loads(paths.state_file.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid <= 1 or state.get("start_time") is None or _start_time(pid) != state["start_time"]:
        return None
    return pid
