"""Reading a log's checkpoint files against the public keys a verification was given.

A checkpoint whose form is wrong, or renamed, or badly signed is a problem in its own right; one
signed by a key that was not given is a *key mismatch* (the wrong `--public-key`, or a log that
spans an audit key rotation), reported once per key, never as a missing checkpoint. Several
keys may be given, so a log signed with the old key and then the new one verifies whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from metaproxy.audit.checkpoint import Checkpoint, key_id, parse_checkpoint, signature_problem
from metaproxy.audit.names import LATEST_NAME, checkpoint_name
from metaproxy.audit.signing_keys import load_public_key

PublicKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey] | None
KeyFiles = Path | Sequence[Path] | None


def read_checkpoints(
    named: list[tuple[str, bytes]], keys: dict[str, Ed25519PublicKey]
) -> tuple[list[tuple[str, Checkpoint]], list[str], dict[str, list[str]]]:
    """The checkpoints whose form and signature check out, the problems of the others, and
    the files signed by each key that was not given (key id -> file names)."""
    valid: list[tuple[str, Checkpoint]] = []
    problems: list[str] = []
    unknown_keys: dict[str, list[str]] = {}
    for name, data in named:
        try:
            checkpoint = parse_checkpoint(data)
        except ValueError as exc:
            problems.append(f"{name}: not a valid checkpoint ({exc})")
            continue
        if name not in ("anchor", LATEST_NAME) and name != checkpoint_name(checkpoint.seq):
            problems.append(f"{name}: names seq {checkpoint.seq} (renamed)")
            continue
        if keys:
            if checkpoint.key_id not in keys:
                unknown_keys.setdefault(checkpoint.key_id, []).append(name)
                continue
            bad_signature = signature_problem(checkpoint, keys[checkpoint.key_id])
            if bad_signature:
                problems.append(f"{name}: {bad_signature}")
                continue
        valid.append((name, checkpoint))
    return valid, problems, unknown_keys


def keys_by_id(public_key: PublicKeys) -> dict[str, Ed25519PublicKey]:
    if public_key is None:
        return {}
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    return {key_id(key): key for key in keys}


def key_mismatches(unknown: dict[str, list[str]], keys: dict[str, Ed25519PublicKey]) -> list[str]:
    """One problem per key that signed checkpoints but was not given, named by its first file."""
    given = ", ".join(sorted(keys))
    problems = []
    for signer, names in sorted(unknown.items()):
        others = f", as are {len(names) - 1} more checkpoint(s)" if len(names) > 1 else ""
        problems.append(
            f"{names[0]}: key mismatch: signed by key {signer}, not by the public key(s) given "
            f"({given}){others}: the wrong --public-key, or the audit key was rotated (give "
            "each key, old and new)"
        )
    return problems


def load_public_keys(files: KeyFiles) -> list[Ed25519PublicKey]:
    """The keys in one PEM file, or in each of several (a rotation's old and new keys)."""
    if files is None:
        return []
    return [load_public_key(path) for path in ([files] if isinstance(files, Path) else files)]
