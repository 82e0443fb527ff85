"""moto's whole server (every service; STS and S3 are what we use) on a socket it inherits.

`python -m moto.server` binds the port it is given, and a port its parent found free can be
taken by another process before moto binds it. `StsEmulator` instead binds port 0 itself,
listens, and hands the socket down, so the port is known before moto starts and nobody else
can have it. The application and request handler are moto's own, as `moto.server` runs them.

    python -m metaproxy.testing.moto_server --fd FD
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from types import FrameType


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto's server on an inherited listening socket")
    parser.add_argument("--fd", type=int, required=True, help="a bound, listening TCP socket")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    signal.signal(signal.SIGTERM, _stop)
    listener = socket.socket(fileno=args.fd)
    host, port = listener.getsockname()[:2]
    listener.detach()  # werkzeug makes its own socket object from the descriptor
    server = make_server(
        host,
        port,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
        fd=args.fd,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
