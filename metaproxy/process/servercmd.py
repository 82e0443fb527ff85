"""The shape every long-running command shares (`metaproxy broker`, `metaproxy sidecar`,
`metaproxy webhook`): config flags and environment built into the frozen config, the files it
reads checked, logging set up, a `--ready-file`, and the server's coroutine run on the event loop
until a signal. Ordinary mistakes end as one line naming the flag (see `metaproxy.cli.main`)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from metaproxy.clihelp import HelpFormatter, add_flag
from metaproxy.config import C, add_config_arguments

Serve = Callable[[C, Path | None], Coroutine[Any, Any, int]]

# asyncio and uvloop both name the address in a failed bind: "... bind on address
# ('127.0.0.1', 8443): address already in use".
_BIND_ADDRESS = re.compile(r"\('?\[?([^',\]]*)\]?'?, (\d+)\)")
_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def register_server(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    config_class: type[C],
    serve: Serve[C],
    *,
    description: str | None = None,
) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=description or help_text,
        formatter_class=HelpFormatter,
    )
    add_config_arguments(parser, config_class)
    add_flag(
        parser,
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write the bound URLs and the pid here (JSON) once listening",
    )

    def run_command(args: argparse.Namespace) -> int:
        from metaproxy.config import build_config, readable_paths
        from metaproxy.errors import StartError
        from metaproxy.logs import setup_logging
        from metaproxy.process.runtime import run, server_tls_context

        config = build_config(config_class, args)
        readable_paths(config)
        # Load a server's TLS pair once here, so a bad certificate or key names its flags.
        server_tls_context(getattr(config, "tls_cert", None), getattr(config, "tls_key", None))
        setup_logging(config.log_format)
        try:
            return run(serve(config, args.ready_file))
        except OSError as exc:
            if exc.errno not in _LISTEN_ERRNOS:
                raise
            raise StartError(describe_listen_error(exc, config)) from None

    parser.set_defaults(func=run_command)


def describe_listen_error(exc: OSError, config: Any) -> str:
    """`--admin-listen: cannot listen on 127.0.0.1:9902: address already in use`."""
    # asyncio puts its own sentence in strerror; the errno's text is the reason.
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    match = _BIND_ADDRESS.search(str(exc))
    if match is None:
        return f"cannot listen: {reason}"
    host, port = match.group(1), match.group(2)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for address in value if isinstance(value, tuple) else (value,):
            if isinstance(address, str) and address.endswith(f":{port}") and host in address:
                flag = "--" + f.name.replace("_", "-")
                return f"{flag}: cannot listen on {address}: {reason}"
    return f"cannot listen on {host}:{port}: {reason}"
