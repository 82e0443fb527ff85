"""IMDSv2 session tokens: stateless, HMAC-signed with a key that lives only in this process.

Stateless means any number of concurrent tokens cost nothing to keep; a restart changes the key,
so old tokens get 401 and SDKs recover by asking for a new one (botocore and the JS SDK both do).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from collections.abc import Callable

_VERSION = 1
_PAYLOAD = struct.Struct(">BQ8s")  # version, expiry (monotonic ms), nonce
_MAC_BYTES = 16
TOKEN_LENGTH = len(base64.urlsafe_b64encode(b"\0" * (_PAYLOAD.size + _MAC_BYTES)))
MIN_TTL = 1
MAX_TTL = 21_600
# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
_TTL = re.compile(r"[0-9]{1,5}")


# Tokens already verified, with their expiry: an SDK sends the same token on every request,
# and a dict lookup is a tenth of the HMAC. Bounded: a client minting tokens in a loop only
# resets the cache (each mint is rate-limited anyway).
_VERIFIED_MAX = 4096


class TokenAuthority:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        # os.urandom is what `secrets.token_bytes` returns; `secrets` itself would import
        # `random` (issue 13: modules the sidecar needs nowhere else are every pod's memory).
        self._key = os.urandom(32)
        self._monotonic = monotonic
        self._verified: dict[str, float] = {}

    def mint(self, ttl_seconds: int) -> str:
        expiry_ms = int((self._monotonic() + ttl_seconds) * 1000)
        payload = _PAYLOAD.pack(_VERSION, expiry_ms, os.urandom(8))
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(payload + mac).decode("ascii")

    def valid(self, token: str) -> bool:
        expiry = self._verified.get(token)
        if expiry is not None:
            if self._monotonic() * 1000 < expiry:
                return True
            del self._verified[token]
            return False
        if not self._verify(token):
            return False
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = _PAYLOAD.unpack(
            base64.urlsafe_b64decode(token.encode("ascii"))[: _PAYLOAD.size]
        )[1]
        return True

    def _verify(self, token: str) -> bool:
        if len(token) != TOKEN_LENGTH:
            return False
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        payload, mac = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            return False
        version, expiry_ms, _nonce = _PAYLOAD.unpack(payload)
        return bool(version == _VERSION and self._monotonic() * 1000 < expiry_ms)


def parse_ttl(raw: str | None) -> int | None:
    """The TTL header as AWS accepts it: an integer 1..21600, else None (→ 400)."""
    if raw is None or not _TTL.fullmatch(raw.strip()):
        return None
    ttl = int(raw.strip())
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None
