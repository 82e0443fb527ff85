"""`metaproxy audit tail`: the newest records of a local log and, with `--follow`, each one
written after, as the operator's terminal may safely show them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from metaproxy.audit.names import sorted_segments
from metaproxy.logs import printable


def tail(directory: Path, lines: int, *, follow: bool) -> int:
    """Print the newest `lines` records; with `follow`, keep printing new ones (until killed)."""
    if not directory.is_dir():
        print(f"metaproxy audit tail: {directory} is not a directory", file=sys.stderr)
        return 2
    segments = sorted_segments(directory)
    recent: list[bytes] = []
    for _, path in reversed(segments):
        recent = path.read_bytes().splitlines() + recent
        if len(recent) >= lines:
            break
    for line in recent[-lines:] if lines > 0 else []:
        print(_terminal_line(line), flush=True)
    if not follow:
        return 0
    # Poll: segments are append-only and rotation creates files with higher names.
    current = segments[-1][1] if segments else None
    position = current.stat().st_size if current else 0
    while True:
        for _, path in sorted_segments(directory):
            if current is None or path.name > current.name:
                if current is not None:
                    _print_from(current, position)  # the rest of the segment just closed
                current, position = path, 0
        if current is not None:
            position = _print_from(current, position)
        time.sleep(0.5)


def _print_from(path: Path, position: int) -> int:
    """Print complete lines after `position`; returns the offset after the last one printed."""
    with path.open("rb") as file:
        file.seek(position)
        data = file.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        print(_terminal_line(line), flush=True)
    return position + end


def _terminal_line(line: bytes) -> str:
    """A stored record as the operator's terminal may show it: records carry client strings
    (task names, reasons), and canonical JSON keeps C1 controls (U+009B is CSI) and bidi
    overrides raw, so they are escaped here."""
    return printable(line.decode("utf-8", "replace"))
