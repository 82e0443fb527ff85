"""moto's STS on its own, served by waitress: the local STS for the benchmarks.

`python -m moto.server` sends every request through moto's all-services dispatcher, which
matches the URL against hundreds of services' patterns under one lock, and its development
server closes the connection after every answer (so each AssumeRole is also a new TCP
connection and a new thread). On two cores that held moto to about 360 AssumeRole/s, under
the 500/s budget the burst benchmark is about. moto's STS application is used unchanged; only
the routing in front of it and the HTTP server differ: waitress keeps connections alive and
answers on a fixed pool of threads.

    python -m metaproxy.testing.moto_sts --fd FD

Like `moto_server`, it serves on a bound, listening socket its parent hands down (`StsEmulator`
binds port 0), so no other process can take the port between the choice and the start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from types import FrameType

# Enough threads that a short moto call never waits behind another for long; moto holds the
# GIL for most of a call, so more would only add switching.
THREADS = 8
# The broker's pool keeps up to workers_max connections open through the fault proxy.
CONNECTION_LIMIT = 2_000


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto's STS on 127.0.0.1, served by waitress")
    parser.add_argument("--fd", type=int, required=True, help="a bound, listening TCP socket")
    args = parser.parse_args(argv)

    import waitress
    from moto.moto_server.werkzeug_app import create_backend_app

    logging.getLogger("waitress").setLevel(logging.ERROR)  # no line per queued task
    signal.signal(signal.SIGTERM, _stop)
    waitress.serve(
        create_backend_app("sts"),
        sockets=[socket.socket(fileno=args.fd)],
        threads=THREADS,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=120,
        ident="moto-sts",
    )


if __name__ == "__main__":
    main()
