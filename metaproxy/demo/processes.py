"""Child processes that announce themselves through a ready file (their bound URLs and pid), and
the demo's stop: SIGTERM to a group of children, each drained within a deadline.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so every child would
start stopping at once, STS and the store before the brokers that use them. The demo therefore
starts its children with SIGINT blocked (`children_ignore_interrupt`): they inherit the blocked
signal and stop only when the demo sends SIGTERM, in order. SIGTERM itself stays deliverable;
blocking it as well was why every child used to be SIGKILLed after 10 s without draining.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ready: dict[str, Any] = field(default_factory=dict)
    log: IO[bytes] | None = None

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, wait up to `timeout`, SIGKILL past it. True when it exited by itself."""
        return stop_all([self], timeout) == []


def stop_all(children: list[Child], timeout: float) -> list[str]:
    """SIGTERM every child at once, give them `timeout` together to drain, SIGKILL the rest.
    Returns the names of those that had to be killed."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
            killed.append(child.name)
        if child.log is not None:
            child.log.close()
            child.log = None
    return killed


@contextlib.contextmanager
def children_ignore_interrupt() -> Iterator[Callable[[], bool]]:
    """Block SIGINT (children inherit the mask) and catch SIGTERM; yields `requested()`, true
    once either arrived. The caller polls it between start-up steps and while serving."""
    requested = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True

    def stop_requested() -> bool:
        nonlocal requested
        if signal.SIGINT in signal.sigpending():
            signal.sigtimedwait({signal.SIGINT}, 0)  # consume it
            requested = True
        return requested

    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop_requested
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def wait_for_stop(stop_requested: Callable[[], bool], poll: float = 0.2) -> None:
    """Until Ctrl-C or SIGTERM."""
    while not stop_requested():
        if signal.sigtimedwait({signal.SIGINT}, poll) is not None:  # wakes at once on Ctrl-C
            return


def start_metaproxy(
    name: str,
    args: list[str],
    *,
    ready_file: Path,
    log_file: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Child:
    """`python -m metaproxy ARGS --ready-file F`, waiting until F appears (or the child dies)."""
    ready_file.unlink(missing_ok=True)
    log = log_file.open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own entry point, arguments we built
        [sys.executable, "-m", "metaproxy", *args, "--ready-file", str(ready_file)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    child = Child(name, process, log=log)
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if process.poll() is not None:
            child.stop()
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"{name} did not start within {timeout:.0f}s; see {log_file}")
        time.sleep(0.02)
    child.ready = json.loads(ready_file.read_text())
    return child


def wait_ready(admin_url: str, timeout: float = 30.0, poll: float = 0.01) -> float:
    """Poll `/readyz` until it answers 200; returns the monotonic time it did."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(admin_url + "/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{admin_url} not ready after {timeout:.0f}s")
        time.sleep(poll)


def stop_step(name: str, stop: Callable[[], None]) -> Callable[[], None]:
    """An exit-stack step that stops a service and says how long it took."""

    def stopped() -> None:
        started = time.monotonic()
        stop()
        print(f"stopped {name} ({time.monotonic() - started:.1f}s)")

    return stopped
