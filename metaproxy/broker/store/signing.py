"""Revocations the store holds and pushes are signed with a key only the replicas have.

The store is shared infrastructure, and its pub/sub channel takes any client's PUBLISH: without a
signature one unauthenticated `lift` message lifted a revocation on every replica at once. Each
stored revocation, each lift's tombstone and each pushed message carries an HMAC-SHA256 under a
subkey of the store key (`Sealer.derive`); the first key signs, every key verifies, so the
documented two-phase key rotation (add the new key second everywhere, then make it first)
rotates these too. A value or message that does not verify is refused, counted and reported.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

PURPOSE = "revocations"


class RevocationSigner:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a signer needs a key")
        self._keys = keys

    def sign(self, kind: str, record: Mapping[str, str]) -> str:
        return self._mac(self._keys[0], kind, record)

    def verify(self, kind: str, record: Mapping[str, str], signature: object) -> bool:
        if not isinstance(signature, str):
            return False
        return any(
            hmac.compare_digest(self._mac(key, kind, record), signature) for key in self._keys
        )

    @staticmethod
    def _mac(key: bytes, kind: str, record: Mapping[str, str]) -> str:
        # The kind is signed too: a revocation's signature never makes a lift valid.
        message = json.dumps([kind, dict(record)], sort_keys=True, separators=(",", ":"))
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
