"""The control API's bearer tokens, one per operator, re-read when their source changes.

Two sources: `--control-token-file`, one token every operator shares (its operator is
`shared`), and `--control-tokens`, one token per named operator, as a file of `NAME:TOKEN`
lines or a directory with one file per operator (a Kubernetes Secret mounted as a volume: its
keys are the names). A revoke's audit record then says who, not only from which address.

A change is any of mtime, size or inode of the file, or of any file in the directory
(Kubernetes swaps a `..data` symlink atomically, possibly within one mtime tick). A source
emptied, cut short, malformed or removed after the start is an operator taking the tokens away:
from then on every request is refused (fail closed), never answered with tokens read before.
A token removed from the source stops working at the next request.
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path
from typing import Final

from metaproxy.errors import ConfigError

log = logging.getLogger("metaproxy.broker.control")

MAX_TOKEN_BYTES: Final = 4096
MAX_TOKENS_FILE_BYTES: Final = 256 << 10
MIN_TOKEN_CHARS: Final = 16
SHARED_OPERATOR: Final = "shared"  # the one token of --control-token-file
OPERATOR_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

Stamp = tuple[tuple[str, int, int, int], ...]


def _stamp(path: Path) -> Stamp | None:
    """What changes when the source does; None when it cannot be read at all."""
    try:
        if not path.is_dir():
            stat = path.stat()
            return (("", stat.st_mtime_ns, stat.st_size, stat.st_ino),)
        entries = [("/", *_triple(path))]
        for entry in sorted(path.iterdir()):
            if not entry.name.startswith("."):
                entries.append((entry.name, *_triple(entry)))
        return tuple(entries)
    except OSError:
        return None


def _triple(path: Path) -> tuple[int, int, int]:
    stat = path.stat()  # follows the Secret's symlinks to the files they name now
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class ControlTokens:
    """Operator name by token, from `path`: one shared token (`named=False`), or named ones."""

    def __init__(self, path: Path, *, named: bool) -> None:
        self._path = path
        self._named = named
        self._setting = "control_tokens" if named else "control_token_file"
        self._tokens: dict[bytes, str] | None = None
        # At start, a problem is a ConfigError.
        self._stamp = _stamp(path)
        self._tokens = self._read()

    def _read(self) -> dict[bytes, str]:
        try:
            if not self._named:
                raw = self._path.read_bytes()[:MAX_TOKEN_BYTES].strip()
                tokens = {SHARED_OPERATOR: self._token(raw, str(self._path))}
            elif self._path.is_dir():
                tokens = self._read_directory()
            else:
                tokens = self._read_lines(self._path.read_bytes()[:MAX_TOKENS_FILE_BYTES])
        except OSError as exc:
            raise ConfigError(
                f"{self._setting}: cannot read {self._path}: {exc.strerror}"
            ) from None
        if not tokens:
            raise ConfigError(f"{self._setting}: {self._path} names no operator")
        by_token: dict[bytes, str] = {}
        for name, token in tokens.items():
            if token in by_token:
                # One token for two names would put the wrong name on a revocation.
                raise ConfigError(
                    f"{self._setting}: {name} and {by_token[token]} have the same token"
                )
            by_token[token] = name
        return by_token

    def _read_directory(self) -> dict[str, bytes]:
        tokens: dict[str, bytes] = {}
        for entry in sorted(self._path.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue  # the Secret's ..data machinery
            raw = entry.read_bytes()[:MAX_TOKEN_BYTES].strip()
            tokens[self._operator(entry.name, str(entry))] = self._token(raw, str(entry))
        return tokens

    def _read_lines(self, data: bytes) -> dict[str, bytes]:
        tokens: dict[str, bytes] = {}
        for number, raw in enumerate(data.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            where = f"{self._path} line {number}"
            name, colon, token = line.partition(b":")
            if not colon:
                raise ConfigError(f"{self._setting}: {where} is not NAME:TOKEN")
            operator = self._operator(name.decode("ascii", "replace").strip(), where)
            if operator in tokens:
                raise ConfigError(f"{self._setting}: {where} names {operator} a second time")
            tokens[operator] = self._token(token.strip(), where)
        return tokens

    def _operator(self, name: str, where: str) -> str:
        if not OPERATOR_RE.match(name):
            raise ConfigError(
                f"{self._setting}: {where}: operator name {name!r} is not letters, digits, "
                "and . _ @ - (at most 64)"
            )
        return name

    def _token(self, raw: bytes, where: str) -> bytes:
        if len(raw) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{self._setting}: {where} holds fewer than {MIN_TOKEN_CHARS} characters"
            )
        return raw

    def _current(self) -> dict[bytes, str] | None:
        stamp = _stamp(self._path)
        if stamp is not None and stamp == self._stamp:
            return self._tokens
        try:
            tokens: dict[bytes, str] | None = self._read()
        except ConfigError as exc:
            if self._tokens is not None:
                log.error("%s; refusing every control request until it is fixed", exc.detail)
            tokens = None
        self._tokens, self._stamp = tokens, stamp
        return tokens

    def operator(self, offered: str | None) -> str | None:
        """The name of the operator whose token `offered` is, or None."""
        tokens = self._current()
        if not offered or tokens is None:
            return None
        given = offered.encode("utf-8", "surrogateescape")
        found = None
        for token, name in tokens.items():
            # Every token compared, in constant time: timing says nothing of which came close.
            if hmac.compare_digest(given, token):
                found = name
        return found

    def matches(self, offered: str | None) -> bool:
        return self.operator(offered) is not None


class ControlToken(ControlTokens):
    """The single shared token of `--control-token-file`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, named=False)
