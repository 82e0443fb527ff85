"""Hand start-up's leftovers back once the sidecar has started (issue 13: every pod pays for
the sidecar's anonymous memory).

Called once, when the first credentials are in: that is the end of start-up (the broker's TLS
context, handshake and answer are the last of it), and from then on the sidecar allocates
little. Two kinds of leftovers:

- garbage in reference cycles, which refcounting never frees: the command-line parser and its
  actions, classes that `datetime` replaces with its C versions. They would wait for the
  collector's next full pass (rare, and later the more objects start-up made); `gc.collect()`
  frees them now, so their memory serves what the sidecar allocates later;
- free pages inside glibc's heap (the temporaries of importing, of parsing the flags, of the
  first broker exchange): freed, but still resident. `malloc_trim(0)` returns them. glibc only:
  elsewhere (musl, macOS) there is no such call, and nothing to do.
"""

from __future__ import annotations

import gc


def release_free_heap() -> None:
    gc.collect()
    trim_free_heap()


def trim_free_heap() -> None:
    """Only the second: also after a burst of connections (`ConnectionTracker.after_burst`),
    whose protocols, parsers and buffers were freed when they closed but stay resident, a few
    kilobytes each (issue 19: 50 connections left a quarter of a megabyte). A millisecond or
    so, when the connections have gone; no collection, which could take far longer."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return
    trim(0)
