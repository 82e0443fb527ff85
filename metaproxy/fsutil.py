"""Writing a file so that a crash leaves the old version or the new one, never half of either.

The one atomic-write helper: keys, tokens, the revocation state and ready files all go through
it."""

from __future__ import annotations

import os
from pathlib import Path

# Created new, never through a link, closed on exec (what tempfile.mkstemp does; this module is
# on the sidecar's path, and `tempfile` imports `shutil`, `bz2`, `lzma` and `random` with it).
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a temporary file beside `path` (created with `mode`, never following a link),
    fsync it, rename it over `path`, and fsync the folder: the rename is only durable once the
    directory entry is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(path)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new 0600 file beside `path`, named `.NAME.RANDOM.tmp`."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(candidate, _CREATE_NEW, 0o600), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")
