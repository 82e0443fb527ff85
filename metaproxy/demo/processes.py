"""Child processes that announce themselves through a ready file (their bound URLs and pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ready: dict[str, Any] = field(default_factory=dict)
    log: IO[bytes] | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()


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
