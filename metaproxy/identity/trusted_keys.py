"""The keys of each trusted issuer, from its JWKS file, re-read whenever the file changes
(issuers whose keys come from a URL: `remote_keys.py`).

A bad JWKS at start-up is refused outright: better not to start than trust nothing. A broken
replacement later keeps the last good keys (and is logged once), as does a file removed or
unreadable for a moment, so a botched key rotation never turns into refusing every task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.jwks import load_jwks
from metaproxy.identity.keys import PublicKey, VerifyingAlgorithm

log = logging.getLogger("metaproxy.identity")

FileState = tuple[int, int, int]
KeySet = dict[str, tuple[PublicKey, VerifyingAlgorithm]]


class UnknownKid(Unauthenticated):
    """The token names a key its issuer's set does not hold (yet): an issuer whose keys come
    from a URL may have published it since the last fetch (`remote_keys.py`)."""

    def __init__(self, issuer: str) -> None:
        super().__init__("unknown kid for this issuer", reason="bad_signature")
        self.issuer = issuer


def select_key(
    keys: KeySet, header: Mapping[str, Any], issuer: str
) -> tuple[PublicKey, VerifyingAlgorithm]:
    """The key the header's `kid` names, with the algorithm pinned to it."""
    kid = header.get("kid")
    if kid is None and not keys:
        raise UnknownKid(issuer)  # an issuer by URL not fetched yet: its only key may come
    if kid is None:
        if len(keys) == 1:
            return next(iter(keys.values()))
        raise Unauthenticated(
            "token has no kid and the issuer has several keys", reason="bad_signature"
        )
    found = keys.get(kid)
    if found is None:
        raise UnknownKid(issuer)
    return found


@dataclass(slots=True)
class IssuerKeys:
    """One trusted issuer's JWKS, as last read."""

    trust: TrustedIssuer
    path: Path
    keys: KeySet
    file_state: FileState
    failed_state: FileState | None = None

    @classmethod
    def load(cls, trust: TrustedIssuer, path: Path) -> IssuerKeys:
        try:
            state = _file_state(path)
        except OSError as exc:
            raise ConfigError(f"cannot read JWKS {path}: {exc.strerror}") from None
        return cls(trust, path, load_jwks(path), state)

    def refresh(self) -> None:
        """Re-read the JWKS if its file changed; a broken replacement keeps the last good keys."""
        try:
            state = _file_state(self.path)
        except OSError:
            return  # removed or unreadable for a moment: keep verifying with what we have
        if state in (self.file_state, self.failed_state):
            return
        try:
            self.keys = load_jwks(self.path)
        except ConfigError as exc:
            self.failed_state = state
            log.warning("keeping previous JWKS for %s: %s", self.trust.issuer, exc.detail)
            return
        self.file_state, self.failed_state = state, None
        log.info("reloaded JWKS for %s (%d keys)", self.trust.issuer, len(self.keys))

    def select(self, header: Mapping[str, Any]) -> tuple[PublicKey, VerifyingAlgorithm]:
        """The key the header's `kid` names, with the algorithm pinned to it."""
        return select_key(self.keys, header, self.trust.issuer)


def _file_state(path: Path) -> FileState:
    # The inode catches an atomic rename even when the mtime has not ticked.
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
