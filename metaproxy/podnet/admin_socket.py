"""Asking an attached sidecar whether it is ready: `GET /readyz` over its admin socket, a Unix
socket on the host's file system (sockets are named by path, not by network namespace, so the
host reaches a sidecar inside any namespace this way)."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def probe_ready(admin_socket: Path, timeout: float = 1.0) -> tuple[bool, str]:
    """GET /readyz over the admin socket: (ready, the sidecar's one-line reason)."""
    connection = _UnixHTTPConnection(admin_socket, timeout)
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        body = response.read(512).decode(errors="replace").strip()
        return response.status == 200, f"{response.status} {body}"
    except OSError as exc:
        return False, f"admin socket: {exc.strerror or type(exc).__name__}"
    finally:
        connection.close()
