"""The hash chain: canonical encoding, record hashes, and checking a stored record.

Every record's `hash` covers the previous record's hash and the record's own canonical bytes,
so changing, dropping, duplicating or reordering any record breaks every later link. The
domain-separation prefix keeps a record hash from ever being confused with a checkpoint
signature input or any other SHA-256 the system computes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

RECORD_DOMAIN: Final = b"metaproxy-audit-record-v1\x00"
ZERO_HASH: Final = "0" * 64
FIRST_SEQ: Final = 1

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: object) -> bytes:
    """Sorted keys, no spaces, UTF-8: one byte string per value, so bytes can be compared."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def is_hex_hash(value: object) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


def record_hash(prev: str, record: Mapping[str, object]) -> str:
    """SHA-256 over domain || prev hash bytes || canonical(record without "hash")."""
    body = {key: value for key, value in record.items() if key != "hash"}
    digest = hashlib.sha256(RECORD_DOMAIN)
    digest.update(bytes.fromhex(prev))
    digest.update(canonical_json(body))
    return digest.hexdigest()


def record_line(record: Mapping[str, object]) -> bytes:
    """The exact bytes stored for a record: its canonical JSON and a newline."""
    return canonical_json(dict(record)) + b"\n"


# Fields the writer owns; a caller that set them would break the chain's bookkeeping.
WRITER_FIELDS: Final = frozenset({"seq", "prev", "hash"})


def iso_millis(moment: datetime) -> str:
    """UTC with milliseconds, e.g. 2026-01-02T14:02:03.456Z: sortable as text."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_line(raw: bytes) -> dict[str, object] | None:
    """A stored line (without its newline) as a record, or None unless it is canonical JSON."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    try:
        if canonical_json(record) != raw:
            return None
    except ValueError:
        return None
    return record


def self_consistent(record: Mapping[str, object], raw: bytes | None = None) -> bool:
    """The record's own seq/prev/hash fields are well formed and its hash is right.

    `raw`, the record's canonical line, lets the hash input be cut out of it instead of
    re-encoding: removing the `"hash"` member from canonical JSON leaves the canonical JSON
    of the rest. When the member's bytes occur more than once, the slow way decides.
    """
    seq, prev, stored = record.get("seq"), record.get("prev"), record.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < FIRST_SEQ:
        return False
    if not isinstance(prev, str) or not isinstance(stored, str):
        return False
    if not is_hex_hash(prev) or not is_hex_hash(stored):
        return False
    if raw is not None:
        member = b'"hash":"' + stored.encode() + b'"'
        if raw.count(member) == 1:  # then it is the top-level member, so the cut is exact
            cut = b"," + member if b"," + member in raw else member + b","
            body = raw.replace(cut, b"", 1)
            return hashlib.sha256(RECORD_DOMAIN + bytes.fromhex(prev) + body).hexdigest() == stored
    return record_hash(prev, record) == stored
