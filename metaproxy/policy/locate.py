"""Find the line of a field in a TOML file, so every policy problem can say `file:line: field`.

`tomllib` returns plain dicts without positions, so this scans the raw text: table headers
(`[session]`, `[[roles]]` counted per occurrence), dotted keys, and enough of the value syntax
(strings, multi-line strings, arrays spanning lines) not to mistake a line inside a value for a
header. It never raises: on text it cannot follow it simply knows fewer lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

FieldPath = tuple[str | int, ...]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_KEY_LINE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_HEADER_LINE = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED_KEY})\s*(\]\]?)\s*(?:#.*)?$")
_KEY_PARTS = re.compile(_KEY_PART)


def format_path(path: Sequence[str | int]) -> str:
    """`("roles", 1, "arn")` -> `roles[1].arn`; keys that are not bare are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY.match(part) else json.dumps(part)
        text += f".{key}" if text else key
    return text


def _split_key(dotted: str) -> list[str]:
    parts = []
    for raw in _KEY_PARTS.findall(dotted):
        if raw.startswith('"'):
            try:
                parts.append(str(json.loads(raw)))
            except ValueError:
                parts.append(raw[1:-1])
        elif raw.startswith("'"):
            parts.append(raw[1:-1])
        else:
            parts.append(raw)
    return parts


class _ValueScanner:
    """Tracks whether the text so far ends inside a multi-line string or an open bracket."""

    def __init__(self) -> None:
        self.multiline_quote = ""  # `'''` or `\"\"\"` while inside one
        self.depth = 0  # open [ and { outside strings

    @property
    def inside_value(self) -> bool:
        return bool(self.multiline_quote) or self.depth > 0

    def feed(self, line: str) -> None:
        i = 0
        while i < len(line):
            if self.multiline_quote:
                end = self._find_close(line, i, self.multiline_quote)
                if end < 0:
                    return
                i, self.multiline_quote = end, ""
                continue
            ch = line[i]
            if ch == "#":
                return
            if line.startswith(('"""', "'''"), i):
                self.multiline_quote = line[i : i + 3]
                i += 3
            elif ch in "\"'":
                end = self._find_close(line, i + 1, ch)
                i = end if end >= 0 else len(line)
            else:
                self.depth += ch in "[{"
                self.depth = max(0, self.depth - (ch in "]}"))
                i += 1

    @staticmethod
    def _find_close(line: str, start: int, quote: str) -> int:
        """Index just past the closing `quote`, or -1; backslash escapes only in basic strings."""
        i = start
        while i < len(line):
            if quote[0] == '"' and line[i] == "\\":
                i += 2
                continue
            if line.startswith(quote, i):
                return i + len(quote)
            i += 1
        return -1


class FieldLocator:
    """Maps field paths to 1-based line numbers, and lines back to the field they belong to."""

    def __init__(self, text: str) -> None:
        self._line_of: dict[FieldPath, int] = {}
        self._field_at: dict[int, FieldPath] = {}
        self._scan(text)

    def line_of(self, path: Sequence[str | int]) -> int:
        """The line of `path`, or of its nearest enclosing field that is written out; 0 if none."""
        key = tuple(path)
        while key:
            if key in self._line_of:
                return self._line_of[key]
            key = key[:-1]
        return 0

    def field_at(self, line: int) -> FieldPath:
        """The field whose key, header or value is on `line` (the enclosing table if none)."""
        return self._field_at.get(line, ())

    def _record(self, path: FieldPath, line: int) -> None:
        for end in range(1, len(path) + 1):
            self._line_of.setdefault(path[:end], line)
        self._field_at[line] = path

    def _scan(self, text: str) -> None:
        table: FieldPath = ()
        array_counts: dict[FieldPath, int] = {}
        scanner = _ValueScanner()
        statement: FieldPath = ()
        for number, line in enumerate(text.splitlines(), start=1):
            if scanner.inside_value:
                self._field_at[number] = statement
                scanner.feed(line)
                continue
            header = _HEADER_LINE.match(line)
            key_line = None if header else _KEY_LINE.match(line)
            if header:
                is_array = header.group(1) == "[["
                table = self._resolve_header(_split_key(header.group(2)), is_array, array_counts)
                statement = table
                self._record(table, number)
            elif key_line:
                statement = table + tuple(_split_key(key_line.group(1)))
                self._record(statement, number)
                scanner.feed(line[key_line.end() :])
            else:
                self._field_at[number] = table

    @staticmethod
    def _resolve_header(
        names: list[str], is_array: bool, array_counts: dict[FieldPath, int]
    ) -> FieldPath:
        # `[[roles]]` is `roles[n]` for its n-th occurrence; `[roles.x]` below it belongs to the
        # latest element, as in TOML itself. Counts are keyed by the indexed parent path, so a
        # nested array restarts at 0 under each new parent element.
        path: list[str | int] = []
        for position, name in enumerate(names, start=1):
            path.append(name)
            key = tuple(path)
            if position == len(names) and is_array:
                array_counts[key] = array_counts.get(key, 0) + 1
            if key in array_counts:
                path.append(array_counts[key] - 1)
        return tuple(path)
