"""Which IMDS paths a task may be shown from its node's own metadata service.

The rules live here, below the parts that use them: the sidecar asks its node only for paths
they permit (`sidecar/host_metadata.py`), and the webhook checks its `--node-metadata` list with
the same grammar. Paths are normalised and checked segment by segment, and a deny-list wins over
any allow-list: the node's role and credentials, its SSH keys, its user-data and its signed
identity documents never come through.
"""

from __future__ import annotations

import re

# Letters, digits and the punctuation IMDS names use (`macs/02:ab:…`, `block-device-mapping`);
# a leading alphanumeric rules out `.`, `..` and hidden tricks before anything reaches the host.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Whatever the allow-list says: the host's role and credentials, its SSH keys, its user-data
# (often secrets) and its signed identity documents (the task has its own) never come through.
_DENY = re.compile(
    r"^(meta-data/(iam|identity-credentials|public-keys)(/|$)|dynamic(/|$))|(^|/)user-data(/|$)",
    re.IGNORECASE,
)


def normalise(path: str) -> str | None:
    """`meta-data//placement/` → `meta-data/placement`; None if any segment is not a plain name."""
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 16 or not all(_SEGMENT.fullmatch(s) for s in segments):
        return None
    return "/".join(segments)


def permitted(path: str, allow: tuple[str, ...]) -> bool:
    """True if `path` (relative to the version, e.g. `meta-data/ami-launch-index`) may be
    fetched from the host: normalised, not denied, and at or below an allow-list entry."""
    clean = normalise(path)
    if clean is None or _DENY.search(clean):
        return False
    for entry in allow:
        prefix = normalise(entry)
        if prefix is not None and (clean == prefix or clean.startswith(prefix + "/")):
            return True
    return False


def allowed_below(path: str, allow: tuple[str, ...]) -> bool:
    """True if an allow-list entry lies strictly below `path` (`meta-data` for an allowed
    `meta-data/placement`): its listing shows the host's allowed entries too."""
    clean = normalise(path)
    if clean is None or _DENY.search(clean):
        return False
    below = [normalise(entry) for entry in allow]
    return any(entry is not None and entry.startswith(clean + "/") for entry in below)
