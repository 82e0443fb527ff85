"""The install-cni DaemonSet's loop: a pass every interval until SIGTERM or SIGINT, and the
ready file (its readiness probe) present exactly while the plugin is in place."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

from metaproxy.fsutil import write_atomically
from metaproxy.podnet.install import Installer

log = logging.getLogger("metaproxy.podnet.install")


def readiness(installer: Installer) -> bytes:
    """The ready file's content: where the plugin is."""
    state = {"binary": str(installer.settings.binary), "config": str(installer.chained_in)}
    return json.dumps(state).encode() + b"\n"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch(
    installer: Installer, *, interval: float, ready_file: Path, uninstall_on_exit: bool
) -> int:
    """Pass after pass, every `interval` seconds, until SIGTERM or SIGINT; the ready file exists
    while the plugin is in place. On the way out the plugin stays (a pod created while the
    DaemonSet rolls would otherwise start without its redirect) unless `uninstall_on_exit`."""
    # Blocked, then taken with sigtimedwait: no handler can run halfway through a pass, and as
    # PID 1 of its container the process still gets SIGTERM (a blocked signal is never ignored).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        while True:
            ready = installer.once()
            _mark(ready_file, readiness(installer) if ready else None)
            received = signal.sigtimedwait(STOP_SIGNALS, interval)
            if received is not None:
                log.info("%s: stopping", signal.Signals(received.si_signo).name)
                break
    finally:
        _mark(ready_file, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if uninstall_on_exit:
        installer.uninstall()
    return 0


def _mark(ready_file: Path, content: bytes | None) -> None:
    try:
        current = ready_file.read_bytes()
    except FileNotFoundError:
        current = None
    if content == current:
        return
    if content is None:
        ready_file.unlink()
        log.info("%s: removed (not ready)", ready_file)
    else:
        write_atomically(ready_file, content, mode=0o644)
        log.info("%s: ready", ready_file)
