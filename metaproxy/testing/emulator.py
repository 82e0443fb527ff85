"""moto's server as a local STS and S3, run as a child process on a loopback port.

moto answers `sts:AssumeRole` for any role ARN without IAM setup, and `GetCallerIdentity` with
the assumed-role ARN, which is all the demo, the tests and the benchmarks need from STS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

FAKE_CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STOP_GRACE_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.05


class EmulatorError(RuntimeError):
    """The emulator could not be started."""


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):  # noqa: S310 - fixed http://127.0.0.1 URL
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


class StsEmulator:
    """Runs `python -m moto.server` on 127.0.0.1; `start()` returns its base URL.

    `sts_only`: run moto's STS application alone behind waitress (`moto_sts`), which sustains
    about twice the AssumeRole rate; for benchmarks, which need STS and nothing else.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: str | Path | None = None,
        sts_only: bool = False,
    ) -> None:
        self._fixed_port = port
        self._sts_only = sts_only
        self._log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None or self._process is None:
            raise EmulatorError("emulator is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EmulatorError("emulator is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30) -> str:
        """Start moto and return `http://127.0.0.1:PORT` once it answers an HTTP GET."""
        if self._process is not None:
            return self.url
        deadline = time.monotonic() + timeout
        # Bound and listening here, then inherited: the port is moto's before moto starts.
        address = ("127.0.0.1", self._fixed_port or 0)
        with socket.create_server(address, backlog=socket.SOMAXCONN) as listener:
            self._process = process = self._launch(listener)
            self._port = listener.getsockname()[1]
        url = f"http://127.0.0.1:{self._port}/"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _answers_http(url):
                return self.url
            time.sleep(POLL_INTERVAL_SECONDS)
        self.stop()
        raise EmulatorError(
            f"moto server did not answer on 127.0.0.1 within {timeout:g}s"
            + (f" (log: {self._log_path})" if self._log_path else "")
        )

    def _launch(self, listener: socket.socket) -> subprocess.Popen[bytes]:
        env = {**os.environ, **FAKE_CREDENTIALS_ENV}
        if self._log_path is not None:
            self._log = self._log_path.open("ab")
        output: IO[bytes] | int = self._log if self._log is not None else subprocess.DEVNULL
        server = "metaproxy.testing.moto_sts" if self._sts_only else "metaproxy.testing.moto_server"
        fd = listener.fileno()
        return subprocess.Popen(  # noqa: S603 - our own interpreter, fixed arguments
            [sys.executable, "-m", server, "--fd", str(fd)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=(fd,),
        )

    def stop(self) -> None:
        """Terminate moto, wait for it, and kill it if it does not exit in time."""
        process, self._process = self._process, None
        self._port = None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            else:
                process.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    # The timeout is passed down rather than applied with `asyncio.timeout`: cancelling the
    # awaiting task would not stop the thread, which would leave a half-started child behind.
    async def astart(self, timeout: float = 30) -> str:  # noqa: ASYNC109
        """`start()` on a worker thread, so the event loop keeps running while moto boots."""
        return await asyncio.to_thread(self.start, timeout)

    async def astop(self) -> None:
        """`stop()` on a worker thread."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()
