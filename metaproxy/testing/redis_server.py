"""A real Valkey (or Redis) server on a loopback port, for the fleet's tests and `demo --replicas`.

It persists the way a fleet's store should: an append-only file fsynced every second and no
RDB snapshots, so `restart()` on the same port and directory shows what survives a clean stop
(everything) and a `kill()` (everything written more than a second before).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

# Valkey is the open-source fork the deployment runs (deploy/kubernetes/components/valkey);
# Debian's redis-server speaks the same protocol and is what most machines already have.
SERVER_BINARIES = ("valkey-server", "redis-server")
CONFIG_NAME = "redis.conf"
LOG_NAME = "redis.log"
# Redis cannot bind port 0 and tell us the port, so a port freed by `free_port()` may be taken
# again before the server binds it; an exit that says "in use" is retried on a fresh port.
START_ATTEMPTS = 3
STOP_GRACE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.02
LOG_TAIL_CHARS = 2000


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServerError(RuntimeError):
    """The server could not be started (the message carries the tail of its log)."""


def find_server_binary() -> str | None:
    """The path of `valkey-server`, else `redis-server`, on PATH; None when neither is."""
    for name in SERVER_BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _quote(value: str) -> str:
    """A config-file string: redis splits lines on spaces unless the value is double-quoted."""
    if any(ord(c) < 0x20 for c in value):
        raise ValueError("config values must not contain control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command(*parts: str) -> bytes:
    """One RESP request (the server's wire protocol), as redis-cli would send it."""
    encoded = [part.encode() for part in parts]
    return b"".join(
        [f"*{len(encoded)}\r\n".encode()]
        + [b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded]
    )


def _answers_ping(port: int, password: str | None) -> bool:
    """True once the server answers PONG: while it replays its AOF it answers -LOADING instead."""
    request = (_command("AUTH", password) if password else b"") + _command("PING")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(request)
            reply = b""
            while b"PONG" not in reply and not reply.startswith(b"-"):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


class RedisServer:
    """`valkey-server` or `redis-server` on 127.0.0.1 with its data, config and log in `directory`.

    `start()` returns the URL the broker takes as `--store`; `restart()` comes back on the same
    port over the same files, so a client's URL stays valid and the AOF is replayed.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        binary: str | None = None,
        port: int | None = None,
        extra_config: tuple[str, ...] = (),
        sentinel: bool = False,
    ) -> None:
        """`extra_config`: more lines for the config file (Cluster mode, a replica of another
        server); `sentinel`: run as a Sentinel (its config then holds `sentinel monitor …`)."""
        self.directory = Path(directory).resolve()
        self._extra_config = extra_config
        self._sentinel = sentinel
        self.password = password
        self._binary = binary
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_NAME

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`, with `:PASSWORD@` when one is set."""
        if self._port is None:
            raise RedisServerError("server has not been started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self._port}/0"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("server has not been started")
        return self._port

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RedisServerError("server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it answers PING."""
        if self._process is not None:
            return self.url
        binary = self._binary or find_server_binary()
        if binary is None:
            raise RedisServerError(f"none of {', '.join(SERVER_BINARIES)} is on PATH")
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        # A port we were given (or had, for a restart) is not ours to swap for another.
        fixed = self._port
        outcome = "not started"
        for _ in range(1 if fixed is not None else START_ATTEMPTS):
            outcome = self._launch_and_wait(binary, fixed or free_port(), deadline)
            if outcome == "up":
                return self.url
            if outcome != "port-taken":
                break
        self._port = fixed
        raise RedisServerError(
            f"{Path(binary).name} did not come up on 127.0.0.1 ({outcome}; waited at most"
            f" {timeout:g}s); log {self.log_path}:\n{self._log_tail()}"
        )

    def restart(self, timeout: float = 15.0) -> str:
        """Stop (if running) and start again on the same port over the same directory."""
        self.stop()
        return self.start(timeout)

    def stop(self) -> None:
        """SIGTERM: the server flushes and fsyncs its AOF before it exits; SIGKILL past a grace."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif process is not None:
            process.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crashed node: only what `appendfsync everysec` has fsynced survives."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
        self._close_log()

    def _launch_and_wait(self, binary: str, port: int, deadline: float) -> str:
        """ "up", or why not ("port-taken", "exited N", "timeout"); on failure nothing runs."""
        config = self.directory / CONFIG_NAME
        self._write_config(config, port)
        self._log = self.log_path.open("ab")
        log_start = self._log.tell()
        # stdout/stderr too: a server that refuses its config says why before it opens its log.
        self._process = subprocess.Popen(  # noqa: S603 - a server binary from PATH, our config
            [binary, str(config), *(["--sentinel"] if self._sentinel else [])],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self._port = port
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self.stop()
                taken = "in use" in self._log_tail(since=log_start)
                return "port-taken" if taken else f"exited {code}"
            if _answers_ping(port, self.password):
                return "up"
            time.sleep(POLL_INTERVAL_SECONDS)
        self.kill()
        return "timeout"

    def _write_config(self, path: Path, port: int) -> None:
        # A config file rather than flags, so the password is not in the process list; 0600
        # because it holds it.
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {_quote(str(self.directory))}",
            f"logfile {_quote(str(self.log_path))}",
            "daemonize no",
            # The fleet's store: every write in the AOF, fsynced each second; no RDB snapshots,
            # whose fork would stall a small test machine and whose loss window is minutes.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "always-show-logo no",
        ]
        if self.password:
            lines.append(f"requirepass {_quote(self.password)}")
        lines += self._extra_config
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text("\n".join(lines) + "\n")

    def _log_tail(self, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
