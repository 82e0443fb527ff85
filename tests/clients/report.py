"""What every Python client program of the matrix prints: one JSON line, then its exit status.

Success: the client's version and what it got, exit 0. Failure: the version and the error in one
line, exit 1, so a cell that must not get credentials fails cleanly and says why. Only access
key ids are ever printed, never a secret key or a session token.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import NoReturn

MAX_ERROR_CHARS = 400


def run(version: str, attempt: Callable[[], dict[str, object]]) -> NoReturn:
    try:
        result = {"version": version, **attempt()}
        status = 0
    except Exception as exc:  # the program's whole point is to report any failure as data
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        result = {"version": version, "error": message[:MAX_ERROR_CHARS]}
        status = 1
    print(json.dumps(result), flush=True)
    sys.exit(status)
