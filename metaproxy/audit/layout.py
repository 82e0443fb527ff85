"""Telling one replica's chain from a fleet: the folder layouts `verify` and `query` accept.

A chain is what `AuditLog` writes (and `S3Shipper` mirrors under `prefix/`): segment files, a
`checkpoints/` folder, `latest-checkpoint.json`. A fleet is what several shippers produce
under `prefix/<instance>/`: one chain per subfolder, nothing of a chain at the top.
"""

from __future__ import annotations

from pathlib import Path

from metaproxy.audit.names import CHECKPOINT_DIR, LATEST_NAME, segment_first_seq


def is_chain(directory: Path) -> bool:
    """Whether `directory` holds a chain's own files (possibly none yet but its folders)."""
    if (directory / CHECKPOINT_DIR).is_dir() or (directory / LATEST_NAME).is_file():
        return True
    return any(segment_first_seq(entry.name) is not None for entry in directory.iterdir())


def chain_dirs(directory: Path) -> list[Path]:
    """The subfolders of a fleet folder that hold a chain, by name."""
    return sorted(entry for entry in directory.iterdir() if entry.is_dir() and is_chain(entry))


def is_fleet(directory: Path) -> bool:
    """Not a chain itself, and at least one subfolder is.

    An emptied fleet folder reads as an empty chain, which passes: that is why `--fleet`
    exists, for checks of a copy known to be a fleet's.
    """
    return not is_chain(directory) and bool(chain_dirs(directory))
