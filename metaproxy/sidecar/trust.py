"""The broker CA bundle, re-read whenever the file changes: CA rotation without restarts.

A rotation (docs/sidecar.md) publishes a bundle holding the old and the new CA, then moves the
broker to a certificate from the new CA, then drops the old CA from the bundle. Each step is a
change of the file (Kubernetes swaps a ConfigMap's files by renaming a directory link, which
changes the inode), noticed by a `stat` before each broker request — one system call a minute.

A bundle that cannot be read or holds no certificate is never taken: the last good one stays in
force (a half-written file must not cut every sidecar off) and the problem is reported once. Only
when there never was a good one is it an error, which the diagnosis shows (`/readyz`, `/healthz`).
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from pathlib import Path

log = logging.getLogger("metaproxy.sidecar.trust")


def client_context(cadata: str | None = None) -> ssl.SSLContext:
    """A verifying client context (hostname and chain) trusting `cadata`, else the system CAs:
    `ssl.create_default_context()`'s, made as an `AsciiNameContext`."""
    context = AsciiNameContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if sys.version_info >= (3, 13):  # what create_default_context adds from 3.13 on
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    if cadata is not None:
        context.load_verify_locations(cadata=cadata)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


class AsciiNameContext(ssl.SSLContext):
    """The standard client context, but an ASCII server name reaches `ssl` as bytes, which it
    takes as they are (`wrap_bio` accepts str or bytes). As a str it passes through the `idna`
    codec, whose first use imports `stringprep` and `unicodedata`: 0.3 MB of anonymous memory
    in every pod, for a name the codec hands back unchanged. A name that is not ASCII still
    goes through it."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if isinstance(server_hostname, str) and server_hostname.isascii():
            server_hostname = server_hostname.encode("ascii")
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


class CaProblem(Exception):
    """No usable CA bundle: `code` is CaUnreadable or CaInvalid, the message one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CaBundle:
    """`bundle.context()` → the TLS context for the next new connection to the broker."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._context: ssl.SSLContext | None = None
        self._seen: tuple[int, ...] | None = None
        self._problem: CaProblem | None = None
        self.generation = 0  # bumped on every bundle taken: connections from before are dropped
        self.reloads = 0

    def context(self) -> ssl.SSLContext:
        if self.path is None:
            if self._context is None:
                self._context = client_context()
            return self._context
        try:
            info = os.stat(self.path)
        except OSError as exc:
            self._seen = None
            self._report(CaProblem("CaUnreadable", f"CA bundle {self.path}: {exc.strerror}"))
        else:
            signature = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
            if signature != self._seen:
                self._seen = signature
                problem = self._load(self.path)
                if problem is not None:
                    self._report(problem)
        if self._context is None:
            assert self._problem is not None
            raise self._problem
        return self._context

    def _load(self, path: Path) -> CaProblem | None:
        """Take the bundle at `path` (None), or say why not."""
        try:
            pem = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not PEM text"
            return CaProblem("CaUnreadable", f"CA bundle {path}: {detail}")
        try:
            context = client_context(pem)
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0][:120]
            return CaProblem("CaInvalid", f"CA bundle {path}: {reason}")
        if not context.get_ca_certs():
            return CaProblem("CaInvalid", f"CA bundle {path}: no certificate in it")
        if self._context is not None:
            self.reloads += 1
            log.info("CA bundle %s reloaded (%d CAs)", path, len(context.get_ca_certs()))
        self._context = context
        self._problem = None
        self.generation += 1
        return None

    def _report(self, problem: CaProblem) -> None:
        """Log a problem once (not on every request), and keep it for the diagnosis."""
        news = self._problem is None or str(self._problem) != str(problem)
        if news and self._context is not None:
            log.warning("%s; still trusting the last good bundle", problem)
        self._problem = problem

    @property
    def problem(self) -> CaProblem | None:
        """Why the current bundle file is not in use (None when it is)."""
        return self._problem
