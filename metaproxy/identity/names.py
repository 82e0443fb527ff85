"""What a token may carry: which task, tenant and app names, and how long it may live.

These claims are written into ARNs, S3 prefixes, session names and tags by policy templates
(`arn:aws:s3:::acme-data/${task}/*`). A task named `victim/config` was scoped to
`acme-data/victim/config/*`: inside the victim's own prefix. So a name is refused unless it is
built from the characters STS accepts in a session name (A-Z a-z 0-9 _+=,.@-), starts with a
letter or digit, and is at most 128 characters long: no `/`, `:`, `*`, `?`, `$`, braces,
whitespace or anything outside ASCII can reach a resource path, and no value can land inside
another's prefix.
"""

from __future__ import annotations

import re

MAX_NAME_CHARS = 128
# Token lifetimes `identity issue` accepts (its --help quotes them): a minute to a day.
MIN_TTL_SECONDS = 60
MAX_TTL_SECONDS = 86_400
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+=,.@-]*", re.ASCII)


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a task, tenant or app name, or None if it can."""
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if not _NAME.fullmatch(value):
        return "must start with a letter or digit and hold only A-Z a-z 0-9 _+=,.@-"
    return None
