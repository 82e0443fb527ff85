"""Read a policy directory's files as one snapshot of bytes, before anything is parsed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class PolicySnapshot:
    """What a policy directory held at one read: each file's bytes, or why it could not be read.

    Loading works on a snapshot, never on files read one by one while they change: the store
    reads twice, a moment apart, and loads only when both reads match (`PolicyStore.watch`)."""

    directory: Path
    exists: bool
    files: tuple[tuple[Path, bytes | str], ...]  # str: the read error


def policy_files(path: Path) -> list[Path]:
    """The policy files of a directory, in load order."""
    # Dot files are editor droppings (emacs `.#acme.toml` lock links), never policies.
    return sorted(
        file for file in path.glob("*.toml") if file.is_file() and not file.name.startswith(".")
    )


def read_policy_dir(path: Path) -> PolicySnapshot:
    """Every policy file's bytes (a file past MAX_FILE_BYTES is read one byte past it, no more)."""
    if not path.is_dir():
        return PolicySnapshot(path, False, ())
    files: list[tuple[Path, bytes | str]] = []
    for file in policy_files(path):
        try:
            with file.open("rb") as handle:
                files.append((file, handle.read(MAX_FILE_BYTES + 1)))
        except OSError as exc:
            files.append((file, f"cannot read: {exc.strerror}"))
    return PolicySnapshot(path, True, tuple(files))
