"""The hash chain: canonical encoding, record hashes and segment file names.

Every record's `hash` covers the previous record's hash and the record's own canonical bytes,
so changing, dropping, duplicating or reordering any record breaks every later link. The
domain-separation prefix keeps a record hash from ever being confused with a checkpoint
signature input or any other SHA-256 the system computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

RECORD_DOMAIN: Final = b"metaproxy-audit-record-v1\x00"
ZERO_HASH: Final = "0" * 64
FIRST_SEQ: Final = 1

SEGMENT_RE: Final = re.compile(r"^segment-(\d{12})\.jsonl$")
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


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def segment_first_seq(name: str) -> int | None:
    """The first seq a segment file name promises, or None if it is not a segment name."""
    match = SEGMENT_RE.match(name)
    return int(match.group(1)) if match else None


# Fields the writer owns; a caller that set them would break the chain's bookkeeping.
WRITER_FIELDS: Final = frozenset({"seq", "prev", "hash"})
_TAIL_BYTES: Final = 1 << 20  # far above the largest record (fields are capped at 2 KiB)


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


def read_tail(path: Path) -> tuple[dict[str, object] | None, int, int]:
    """(last complete, valid record or None, offset just past it, file size); missing = empty."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = max(0, size - _TAIL_BYTES)
            file.seek(start)
            data = file.read()
    except FileNotFoundError:
        return None, 0, 0
    cut = data.rfind(b"\n")
    if cut < 0:
        return None, 0, size
    end = start + cut + 1
    line_start = data.rfind(b"\n", 0, cut) + 1
    record = parse_line(data[line_start:cut])
    if record is None or not self_consistent(record):
        return None, end, size
    return record, end, size


def sorted_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files in chain order (by the first seq their names promise)."""
    found = []
    for entry in directory.iterdir():
        first_seq = segment_first_seq(entry.name)
        if first_seq is not None and entry.is_file():
            found.append((first_seq, entry))
    return sorted(found)
