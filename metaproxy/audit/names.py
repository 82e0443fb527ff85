"""The names of a chain's files: what each says, and finding them in a folder.

A chain is `segment-<first seq>.jsonl` files, a `checkpoints/` folder of
`checkpoint-<seq>.json`, and, in a shipped copy, `latest-checkpoint.json`. Seqs are zero-padded
to twelve digits, so names sort in chain order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

SEGMENT_RE: Final = re.compile(r"^segment-(\d{12})\.jsonl$")
CHECKPOINT_DIR: Final = "checkpoints"  # beside the segments, one file per checkpoint
CHECKPOINT_RE: Final = re.compile(r"^checkpoint-(\d{12})\.json$")
LATEST_NAME: Final = "latest-checkpoint.json"


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def segment_first_seq(name: str) -> int | None:
    """The first seq a segment file name promises, or None if it is not a segment name."""
    match = SEGMENT_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:012d}.json"


def sorted_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files in chain order (by the first seq their names promise)."""
    found = []
    for entry in directory.iterdir():
        first_seq = segment_first_seq(entry.name)
        if first_seq is not None and entry.is_file():
            found.append((first_seq, entry))
    return sorted(found)
