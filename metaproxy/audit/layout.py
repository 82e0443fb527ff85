"""Telling one replica's chain from a fleet: the folder layouts `verify`, `query` and `tail` accept.

A chain is what `AuditLog` writes (and `S3Shipper` mirrors under `prefix/`): segment files, a
`checkpoints/` folder, `latest-checkpoint.json`. A fleet is what several shippers produce
under `prefix/<instance>/`: one chain per subfolder, nothing of a chain at the top.

A folder holding both (a single broker and a fleet pointed at one state directory, or one S3
prefix) is neither: reading it as either silently drops the other's records, so it is an error
unless the caller says which to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from metaproxy.audit.names import CHECKPOINT_DIR, LATEST_NAME, segment_first_seq

Layout = Literal["chain", "fleet"]


class MixedLayout(ValueError):
    """A folder with a chain of its own and replica chains in subfolders."""


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


def resolve_layout(directory: Path, fleet: bool | None) -> Layout:
    """The layout to read: `fleet` True or False is the caller's choice (the other kind of
    chain is skipped because it was asked); None detects it, and a mixed folder raises
    `MixedLayout` naming what it holds."""
    if fleet is not None:
        return "fleet" if fleet else "chain"
    replicas = chain_dirs(directory)
    if not is_chain(directory):
        return "fleet" if replicas else "chain"
    if not replicas:
        return "chain"
    segments = sum(1 for entry in directory.iterdir() if segment_first_seq(entry.name) is not None)
    names = ", ".join(f"{replica.name}/" for replica in replicas)
    raise MixedLayout(
        f"{directory} holds one broker's chain ({segments} segment(s) at the top) and "
        f"{len(replicas)} replica chain(s) ({names}); say which to read: --fleet for the "
        "replicas, --single for the top-level chain"
    )
