"""IMDSv2 session tokens: stateless, HMAC-signed with a key of this pod's.

Stateless means any number of concurrent tokens cost nothing to keep. The key lives in a file of
the pod's own memory-backed volume (`--imds-token-key-file`), so a token stays valid for its TTL
across a sidecar restart: PyPI's `ec2-metadata` caches its token for six hours and never retries a
401, and would fail for hours after a restart with a key kept only in the process. Another pod
has another volume, so another key: a token never works in another pod. Without a key file the
key lives in the process, and a restart sends SDKs back for a new token (botocore and the JS SDK
do that on a 401).

A token's expiry is CLOCK_MONOTONIC (time since boot, the same for every process of the host), so
a restarted sidecar reads it as the old one did, and no token outlives a reboot.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import math
import os
import re
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

from metaproxy.errors import ConfigError
from metaproxy.fsutil import write_atomically

_VERSION = 1  # the first byte: tokens read "AQ…", as EC2's do
# version, expiry (monotonic ms), nonce; with the MAC, 40 bytes: 56 characters, EC2's length.
_PAYLOAD = struct.Struct(">BQ15s")
_MAC_BYTES = 16
TOKEN_LENGTH = len(base64.urlsafe_b64encode(b"\0" * (_PAYLOAD.size + _MAC_BYTES)))
KEY_BYTES = 32
MIN_TTL = 1
MAX_TTL = 21_600
# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
_TTL = re.compile(r"[0-9]{1,5}")


# Tokens already verified, with their expiry: an SDK sends the same token on every request,
# and a dict lookup is a tenth of the HMAC. Bounded: a client minting tokens in a loop only
# resets the cache (each mint is rate-limited anyway).
_VERIFIED_MAX = 4096


class TokenAuthority:
    def __init__(
        self, key: bytes | None = None, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        # os.urandom is what `secrets.token_bytes` returns; `secrets` itself would import
        # `random` (issue 13: modules the sidecar needs nowhere else are every pod's memory).
        self._key = key if key is not None else os.urandom(KEY_BYTES)
        self._monotonic = monotonic
        self._verified: dict[str, int] = {}

    def mint(self, ttl_seconds: int) -> str:
        expiry_ms = int((self._monotonic() + ttl_seconds) * 1000)
        payload = _PAYLOAD.pack(_VERSION, expiry_ms, os.urandom(15))
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(payload + mac).decode("ascii")

    def remaining(self, token: str) -> int | None:
        """Whole seconds the token has left (EC2's `X-Aws-Ec2-Metadata-Token-Ttl-Seconds` on every
        answer), or None when it is not a valid token of this pod's."""
        expiry = self._verified.get(token)
        if expiry is None:
            expiry = self._verify(token)
            if expiry is None:
                return None
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[token] = expiry
        left_ms = expiry - self._monotonic() * 1000
        if left_ms <= 0:
            self._verified.pop(token, None)
            return None
        return int(left_ms // 1000)

    def remaining_until(self, token: str) -> tuple[int | None, float]:
        """`remaining(token)`, and until when (`monotonic()`, exclusive) it stays that: the
        next whole second of the token's countdown, or its expiry."""
        left = self.remaining(token)
        if left is None:
            return None, -math.inf
        # A microsecond short of the exact instant: a float a hair past it must not stand.
        return left, (self._verified[token] - left * 1000) / 1000 - 1e-6

    @property
    def monotonic(self) -> Callable[[], float]:
        return self._monotonic

    def valid(self, token: str) -> bool:
        return self.remaining(token) is not None

    def _verify(self, token: str) -> int | None:
        """The token's expiry (monotonic ms) if this key signed it, else None."""
        if len(token) != TOKEN_LENGTH:
            return None
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        payload, mac = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            return None
        version, expiry_ms, _nonce = _PAYLOAD.unpack(payload)
        return int(expiry_ms) if version == _VERSION else None


def parse_ttl(raw: str | None) -> int | None:
    """The TTL header as AWS accepts it: an integer 1..21600, else None (→ 400)."""
    if raw is None or not _TTL.fullmatch(raw.strip()):
        return None
    ttl = int(raw.strip())
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None


def load_or_create_key(path: Path | None) -> bytes | None:
    """The pod's token key from `path`, made there (0600, by rename) when absent or unusable;
    None without a path (a key in the process only). Read without following a link: the
    volume is the pod's own, but a link planted there must not make the sidecar read, or
    replace, a file elsewhere."""
    if path is None:
        return None
    if path.parent.is_symlink():
        raise ConfigError(f"--imds-token-key-file: {path.parent} is a symbolic link")
    key = _read_key(path)
    if key is None:
        key = os.urandom(KEY_BYTES)
        try:
            write_atomically(path, key, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"--imds-token-key-file: {path}: {exc.strerror or type(exc).__name__}"
            ) from None
    return key


def _read_key(path: Path) -> bytes | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            raise ConfigError(
                f"--imds-token-key-file: {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        return None
    try:
        info = os.fstat(fd)
        # Exactly a key, readable by us alone: anything else is replaced, never trusted.
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_size != KEY_BYTES
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            return None
        key = os.read(fd, KEY_BYTES + 1)
        return key if len(key) == KEY_BYTES else None
    finally:
        os.close(fd)
