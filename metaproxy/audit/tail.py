"""`metaproxy audit tail`: the newest records of a log, one chain's or a whole fleet's, and, with
`--follow`, each one written after, as the operator's terminal may safely show them.

A fleet's records are merged in time order (ties in replica and chain order), as `query` does;
each record names its broker in `instance`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from metaproxy.audit.layout import chain_dirs
from metaproxy.audit.names import sorted_segments
from metaproxy.logs import printable


class _Follower:
    """One chain's read position: the segment being read and the offset after its last line."""

    def __init__(self, directory: Path, *, from_start: bool) -> None:
        self.directory = directory
        segments = sorted_segments(directory)
        self.current: Path | None = None if from_start or not segments else segments[-1][1]
        self.position = self.current.stat().st_size if self.current is not None else 0

    def newest(self, lines: int) -> list[bytes]:
        recent: list[bytes] = []
        for _, path in reversed(sorted_segments(self.directory)):
            recent = path.read_bytes().splitlines() + recent
            if len(recent) >= lines:
                break
        return recent[-lines:] if lines > 0 else []

    def new_lines(self) -> list[bytes]:
        """Complete lines written since the last call, across rotations (segments are
        append-only, and rotation creates files with higher names)."""
        found: list[bytes] = []
        for _, path in sorted_segments(self.directory):
            if self.current is None or path.name > self.current.name:
                if self.current is not None:
                    found += self._read()  # the rest of the segment just closed
                self.current, self.position = path, 0
        if self.current is not None:
            found += self._read()
        return found

    def _read(self) -> list[bytes]:
        assert self.current is not None
        with self.current.open("rb") as file:
            file.seek(self.position)
            data = file.read()
        end = data.rfind(b"\n") + 1
        self.position += end
        return data[:end].splitlines()


def tail(directory: Path, lines: int, *, follow: bool, fleet: bool = False) -> int:
    """Print the newest `lines` records; with `follow`, keep printing new ones (until killed)."""
    if not directory.is_dir():
        print(f"metaproxy audit tail: {directory} is not a directory", file=sys.stderr)
        return 2
    chains = chain_dirs(directory) if fleet else [directory]
    followers = {chain: _Follower(chain, from_start=False) for chain in chains}
    newest = [(chain, line) for chain, f in followers.items() for line in f.newest(lines)]
    _print(_in_time_order(newest)[-lines:] if lines > 0 else [])
    if not follow:
        return 0
    while True:
        if fleet:
            for chain in chain_dirs(directory):  # a replica that joined: all it has written
                followers.setdefault(chain, _Follower(chain, from_start=True))
        found = [(chain, line) for chain, f in followers.items() for line in f.new_lines()]
        _print(_in_time_order(found) if fleet else found)
        time.sleep(0.5)


def _in_time_order(lines: list[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """By record time, then replica, then position: one chain keeps its own order (the sort
    is stable), and a line that does not parse sorts by its chain alone."""
    return sorted(lines, key=lambda item: (_time(item[1]), item[0].name))


def _time(line: bytes) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return ""
    value = record.get("time") if isinstance(record, dict) else None
    # The writer's times are one fixed-width UTC form, so they sort as text.
    return value if isinstance(value, str) else ""


def _print(lines: list[tuple[Path, bytes]]) -> None:
    for _, line in lines:
        print(_terminal_line(line), flush=True)


def _terminal_line(line: bytes) -> str:
    """A stored record as the operator's terminal may show it: records carry client strings
    (task names, reasons), and canonical JSON keeps C1 controls (U+009B is CSI) and bidi
    overrides raw, so they are escaped here."""
    return printable(line.decode("utf-8", "replace"))
