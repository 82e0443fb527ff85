"""When one connection of the sidecar's HTTP/1.1 server (`http1`) is read from.

Reading stops for either of two reasons, and resumes only when neither holds:
- the client does not read its answers (the transport's write buffer passed its high mark:
  `pause_writing`), so its next requests would only pile up more answers;
- it has pipelined more requests than the connection queues (`http1.MAX_PIPELINED`).
Without this, a client that sends and never reads would have the sidecar buffer every answer.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("_transport", "reading", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.reading = True
        self.write_paused = False

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Unless the client is still not reading its answers."""
        if not self.reading and not self.write_paused:
            self.reading = True
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
