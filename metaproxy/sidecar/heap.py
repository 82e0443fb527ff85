"""Hand start-up's and bursts' leftovers back (issue 13: every pod pays for the sidecar's
anonymous memory).

- `release_free_heap`, once, when the first credentials are in (the end of start-up: the
  broker's TLS context, handshake and answer are the last of it): garbage in reference cycles,
  which refcounting never frees (the command-line parser and its actions, classes that
  `datetime` replaces with its C versions), would wait for the collector's next full pass;
  `gc.collect()` frees it now, so its memory serves what the sidecar allocates later.
- `trim_free_heap`, after a large burst of connections: free pages inside glibc's heap, freed
  but still resident; `malloc_trim(0)` returns them. It is reached through `ctypes`, whose
  import costs 0.14 MB anonymous and 0.3 MB resident for good, so it is called only where it
  gives back more than that (`wire.connections.BURST_CONNECTIONS`): at start-up it gave back
  less (idle 14.66 MB anonymous with it, 14.53 without), and so did a 50-connection burst.
  glibc only: elsewhere (musl, macOS) there is no such call, and nothing to do.
"""

from __future__ import annotations

import gc


def release_free_heap() -> None:
    gc.collect()


def trim_free_heap() -> None:
    """After a burst of connections (`ConnectionTracker.after_burst`), whose protocols,
    parsers and buffers were freed when they closed but stay resident, a few kilobytes each. A
    millisecond or so, when the connections have gone; no collection, which could take far
    longer."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return
    trim(0)
