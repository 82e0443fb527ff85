"""The keys of each trusted issuer, from its JWKS file, re-read whenever the file changes.

A bad JWKS at start-up is refused outright: better not to start than trust nothing. A broken
replacement later keeps the last good keys (and is logged once), as does a file removed or
unreadable for a moment, so a botched key rotation never turns into refusing every task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.jwks import load_jwks
from metaproxy.identity.keys import PublicKey, VerifyingAlgorithm

log = logging.getLogger("metaproxy.identity")

FileState = tuple[int, int, int]


@dataclass(slots=True)
class IssuerKeys:
    """One trusted issuer's JWKS, as last read."""

    trust: TrustedIssuer
    keys: dict[str, tuple[PublicKey, VerifyingAlgorithm]]
    file_state: FileState
    failed_state: FileState | None = None

    @classmethod
    def load(cls, trust: TrustedIssuer) -> IssuerKeys:
        try:
            state = _file_state(trust)
        except OSError as exc:
            raise ConfigError(f"cannot read JWKS {trust.jwks_file}: {exc.strerror}") from None
        return cls(trust, load_jwks(trust.jwks_file), state)

    def refresh(self) -> None:
        """Re-read the JWKS if its file changed; a broken replacement keeps the last good keys."""
        try:
            state = _file_state(self.trust)
        except OSError:
            return  # removed or unreadable for a moment: keep verifying with what we have
        if state in (self.file_state, self.failed_state):
            return
        try:
            self.keys = load_jwks(self.trust.jwks_file)
        except ConfigError as exc:
            self.failed_state = state
            log.warning("keeping previous JWKS for %s: %s", self.trust.issuer, exc.detail)
            return
        self.file_state, self.failed_state = state, None
        log.info("reloaded JWKS for %s (%d keys)", self.trust.issuer, len(self.keys))

    def select(self, header: Mapping[str, Any]) -> tuple[PublicKey, VerifyingAlgorithm]:
        """The key the header's `kid` names, with the algorithm pinned to it."""
        kid = header.get("kid")
        if kid is None:
            if len(self.keys) == 1:
                return next(iter(self.keys.values()))
            raise Unauthenticated(
                "token has no kid and the issuer has several keys", reason="bad_signature"
            )
        found = self.keys.get(kid)
        if found is None:
            raise Unauthenticated("unknown kid for this issuer", reason="bad_signature")
        return found


def _file_state(trust: TrustedIssuer) -> FileState:
    # The inode catches an atomic rename even when the mtime has not ticked.
    st = os.stat(trust.jwks_file)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
