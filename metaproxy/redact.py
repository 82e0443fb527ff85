"""The one rule for what a secret looks like, for every channel that writes text: logs and audit.

Secrets are never passed to a logger or an audit record in the first place; this catches the
mistake (or an upstream error message that quotes one) and shows it as `[redacted]` instead of
a leak. There used to be two scrubbers with different rules, one per channel, so a token that
one of them let through could still show up in the other.
"""

from __future__ import annotations

import re
from typing import Final

REDACTED: Final = "[redacted]"

# A JWT (header.payload.signature, base64url, header starting with '{"'), anywhere in a value.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
# STS session tokens and other long opaque blobs: ARNs, ids and digests are far shorter or
# contain separators, so a 100-character unbroken base64 run is never a legitimate value.
_LONG_BLOB = re.compile(r"[A-Za-z0-9+/=_-]{100,}")
_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)
# What each pattern cannot match without; checked first, as a plain substring test.
_JWT_START, _PEM_START, _BLOB_CHARS = "eyJ", "-----BEGIN ", 100


def redact(text: str, *, blobs: bool = True) -> str:
    """`text` with every JWT, private key and (unless `blobs` is false, for values such as IAM
    role paths that may form long runs) long opaque blob replaced by `[redacted]`."""
    if len(text) < _BLOB_CHARS and _JWT_START not in text and _PEM_START not in text:
        return text  # none of the patterns can match: most values, on every record
    return redact_patterns(text, blobs=blobs)


def redact_patterns(text: str, *, blobs: bool = True) -> str:
    """`redact` without its fast path (which the tests check against this)."""
    text = _PEM.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    if blobs:
        text = _LONG_BLOB.sub(REDACTED, text)
    return text
