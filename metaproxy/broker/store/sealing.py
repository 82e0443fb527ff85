"""Credentials at rest in the store are sealed with AES-256-GCM under a key the replicas share.

The key file (`--store-key-file`) holds one key per line, base64 of 32 random bytes; blank lines
and `#` comments are ignored. The first key seals; every key opens, so a rotation is: put a new
key first, roll the replicas, and drop the old key once no sealed value can still be under it
(values live in the store for at most a credential's lifetime, 12 hours at the most).

A sealed value is `v1 | key id (8 bytes) | nonce (12) | ciphertext+tag`, and the store key it
is filed under is bound in as associated data, so a value copied to another key does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from metaproxy.errors import ConfigError

VERSION = b"\x01"
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12


class SealedValueInvalid(Exception):
    """A value that does not open: unknown key id, wrong key, truncated or tampered."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"metaproxy-store-key\x00" + key).digest()[:KEY_ID_BYTES]


class Sealer:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(key) != KEY_BYTES for key in keys):
            raise ValueError("a sealer needs at least one 32-byte key")
        self._current_id = _key_id(keys[0])
        self._current = AESGCM(keys[0])
        self._by_id = {_key_id(key): AESGCM(key) for key in keys}
        self._keys = tuple(keys)

    def derive(self, purpose: str) -> list[bytes]:
        """One subkey per store key, for another use of the fleet's shared secret (signing the
        revocations), first the current one: never the sealing keys themselves."""
        return [
            hmac.new(key, f"metaproxy-store-key:{purpose}".encode(), hashlib.sha256).digest()
            for key in self._keys
        ]

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        """Read the key file; every problem is a ConfigError naming the file and line."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"store_key_file: cannot read {path}: {exc.strerror}") from None
        keys: list[bytes] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = base64.b64decode(line.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{path}:{number}: store key is not base64") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(
                    f"{path}:{number}: store key is {len(key)} bytes, must be {KEY_BYTES}"
                )
            keys.append(key)
        if not keys:
            raise ConfigError(f"store_key_file: {path} holds no key")
        return cls(keys)

    def seal(self, plaintext: bytes, *, bound_to: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, plaintext, bound_to.encode())
        return VERSION + self._current_id + nonce + sealed

    def open(self, value: bytes, *, bound_to: str) -> bytes:
        header = 1 + KEY_ID_BYTES + NONCE_BYTES
        if len(value) <= header or value[:1] != VERSION:
            raise SealedValueInvalid("not a sealed value")
        aead = self._by_id.get(value[1 : 1 + KEY_ID_BYTES])
        if aead is None:
            raise SealedValueInvalid("sealed under a key this replica does not have")
        nonce = value[1 + KEY_ID_BYTES : header]
        try:
            return aead.decrypt(nonce, value[header:], bound_to.encode())
        except InvalidTag:
            raise SealedValueInvalid("does not open (tampered, or another key)") from None


def generate_key_line() -> str:
    """One line for a key file: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()
