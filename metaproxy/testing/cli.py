"""`metaproxy sts-emulator` and `metaproxy fault-proxy`: the local STS and the fault injector."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from metaproxy.clihelp import add_flag
from metaproxy.errors import ConfigError

CHILD_CHECK_SECONDS = 0.5


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("the upstream URL takes no query or fragment")
    return text.rstrip("/")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    emulator = subparsers.add_parser(
        "sts-emulator",
        help="run moto's server on 127.0.0.1 as a local STS and S3",
        description="Run moto's server in the foreground on 127.0.0.1 and print its URL.",
    )
    add_flag(
        emulator,
        "--port",
        type=_port,
        default=0,
        allowed="0 to 65535",
        help="port to listen on at 127.0.0.1; 0: a free one (the URL is printed)",
    )
    add_flag(
        emulator,
        "--log",
        type=Path,
        metavar="FILE",
        help="append moto's output to this file; unset: discarded",
    )
    emulator.set_defaults(func=run_sts_emulator)

    proxy = subparsers.add_parser(
        "fault-proxy",
        help="run an HTTP proxy that injects STS latency, throttling and outages",
        description="Forward to UPSTREAM, injecting faults changeable at "
        "ADMIN_URL/_fault; runs until SIGINT or SIGTERM.",
    )
    add_flag(
        proxy,
        "--upstream",
        type=_http_url,
        required=True,
        metavar="URL",
        help="base URL to forward to (http or https, no query), e.g. the sts-emulator's",
    )
    add_flag(
        proxy,
        "--port",
        type=_port,
        default=0,
        allowed="0 to 65535",
        help="proxy port at 127.0.0.1; 0: a free one (the URL is printed)",
    )
    add_flag(
        proxy,
        "--admin-port",
        type=_port,
        default=0,
        metavar="PORT",
        allowed="0 to 65535",
        help="port of the admin API (GET/POST /_fault) that changes the faults while running; "
        "0: a free one",
    )
    add_flag(
        proxy,
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        unit="seconds",
        help="delay added to every request before it is forwarded",
    )
    add_flag(
        proxy,
        "--throttle-fraction",
        type=float,
        default=0.0,
        metavar="FRACTION",
        unit="fraction",
        allowed="0 to 1",
        help="share of AssumeRole requests answered with STS's Throttling error",
    )
    proxy.set_defaults(func=run_fault_proxy)


def run_sts_emulator(args: argparse.Namespace) -> int:
    from metaproxy.testing.emulator import EmulatorError, StsEmulator

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    emulator = StsEmulator(port=args.port or None, log_path=args.log)
    try:
        url = emulator.start()
    except EmulatorError as exc:
        raise ConfigError(str(exc)) from exc
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"sts-emulator: {url}", flush=True)
        while not stop.wait(CHILD_CHECK_SECONDS):
            if not emulator.running:
                print("sts-emulator: moto exited", file=sys.stderr)
                return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        emulator.stop()


def run_fault_proxy(args: argparse.Namespace) -> int:
    from metaproxy.testing.faults import validate_faults

    try:
        faults = validate_faults(
            {"latency": args.latency, "throttle_fraction": args.throttle_fraction}
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return _run(_serve_fault_proxy(args.upstream, args.port, args.admin_port, faults))


async def _serve_fault_proxy(
    upstream: str, port: int, admin_port: int, faults: dict[str, Any]
) -> int:
    from metaproxy.testing.faultproxy import FaultProxy

    proxy = FaultProxy(upstream, port=port, admin_port=admin_port)
    try:
        await proxy.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        proxy.set(**faults)
        print(f"fault-proxy: {proxy.url} -> {upstream}", flush=True)
        print(f"fault-proxy admin: {proxy.admin_url}/_fault", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await proxy.aclose()
    return 0


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
