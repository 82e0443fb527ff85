"""Hand the C heap's free pages back to the kernel once the sidecar has started.

Start-up leaves most of a megabyte free inside glibc's heap (the temporaries of importing,
of parsing the flags, of building the metrics and the faces): freed, but still counted in the
process's anonymous memory, which every pod pays for (issue 13). `malloc_trim(0)` returns those
pages. glibc only: elsewhere (musl, macOS) there is no such call, and nothing to do.
"""

from __future__ import annotations


def release_free_heap() -> None:
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return
    trim(0)
