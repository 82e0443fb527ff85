"""The broker's TLS certificate and key, reloaded when the files change.

cert-manager (or an operator) rotates the certificate by rewriting the files; the broker used to
read them once. `CertificateReloader` watches both files and loads a changed pair into the *same*
`SSLContext`: new handshakes get the new certificate, connections already open keep theirs (none
is dropped). A pair that does not load — a certificate written before its key, a half-written
file — is tried on a scratch context first, so the live one never holds a mismatched pair; the
current certificate stays until a later look finds a good pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path

from metaproxy.errors import StartError
from metaproxy.process.runtime import server_tls_context

log = logging.getLogger("metaproxy.broker")

CHECK_SECONDS = 2.0
_State = tuple[tuple[int, int, int], ...]


def _state(*paths: Path) -> _State:
    # The inode catches an atomic rename (Kubernetes swaps a ..data symlink) within one mtime tick.
    found = []
    for path in paths:
        st = os.stat(path)
        found.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(found)


class CertificateReloader:
    """Keeps `context` (made by `runtime.server_tls_context` from these files) current."""

    def __init__(
        self, context: ssl.SSLContext, cert: Path, key: Path, *, every: float = CHECK_SECONDS
    ) -> None:
        self.context = context
        self._cert, self._key, self._every = cert, key, every
        # A rotation between the first load and this look is picked up by the first check.
        self._loaded = _state(cert, key)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="tls-certificate-reload")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self) -> bool:
        """Load the pair if the files changed and it is good; True if a new one was loaded."""
        try:
            state = _state(self._cert, self._key)
        except OSError:
            return False  # mid-rotation: look again later
        if state == self._loaded:
            return False
        try:
            # A scratch context first, by the same rules: the live one never half-loads.
            server_tls_context(self._cert, self._key)
            self.context.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError, StartError) as exc:
            log.warning("TLS certificate changed but does not load (%s); keeping the current", exc)
            return False
        self._loaded = state
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self._cert)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            await asyncio.to_thread(self.check)
