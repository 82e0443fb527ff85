"""Enter a network namespace by path and come back; read its sysctls.

`setns(2)` moves the calling thread only. That is what the CNI plugin and the `metaproxy
link-local` and `netns` commands are: single-threaded command processes that enter the pod's
namespace, make their changes and leave. Do not use this from a threaded server: another thread
of the process would keep (or, with a thread pool, unpredictably share) the old namespace.

Sockets belong to the namespace the thread was in when they were opened, and so do files under
/proc/sys/net: both are opened inside `entered(...)`. So do child processes (the `iptables`
binaries): they start in the namespace of the thread that forks them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
# The calling thread's own namespace (in a single-threaded process the same as /proc/self's).
CURRENT_NETNS = Path("/proc/thread-self/ns/net")
PROC_SYS = Path("/proc/sys")


class NamespaceError(OSError):
    """A namespace could not be entered or left; `str()` is one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


class NamespaceGone(NamespaceError):
    """The path names no network namespace (any more): nothing there to change or undo."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # Python 3.11 has no os.setns (3.12 does)


def _setns(fd: int, path: Path | str) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        message = f"setns {path}: {os.strerror(code)}"
        # EINVAL: the file is not a network namespace, typically a bind-mount target left
        # behind after the runtime unmounted the pod's namespace.
        raise (NamespaceGone if code == errno.EINVAL else NamespaceError)(code, message)


@contextlib.contextmanager
def entered(netns: Path | None) -> Iterator[None]:
    """Run the body inside the network namespace at `netns` (None: stay where we are), and come
    back whatever happens."""
    if netns is None:
        yield
        return
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(errno.ENOENT, f"{netns}: no such network namespace") from None
    except OSError as exc:
        raise NamespaceError(exc.errno, f"{netns}: {exc.strerror}") from None
    try:
        home = os.open(CURRENT_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, netns)
            try:
                yield
            finally:
                # Failing to come back would leave this process acting on the pod's namespace;
                # the error propagates and the command exits.
                _setns(home, CURRENT_NETNS)
        finally:
            os.close(home)
    finally:
        os.close(target)


def sysctl_path(key: str) -> Path:
    """`net/ipv4/conf/eth0/accept_local` → /proc/sys/net/ipv4/…, refusing `..` and the like
    (slashes, not dots, separate the parts: interface names may hold dots)."""
    parts = key.split("/")
    if not all(parts) or any(part in (".", "..") for part in parts):
        raise ValueError(f"not a sysctl key: {key!r}")
    return PROC_SYS.joinpath(*parts)


def read_sysctl(key: str) -> str:
    """The value as the current namespace sees it (/proc/sys/net resolves to the opener's)."""
    return sysctl_path(key).read_text().strip()
