"""`metaproxy demo`: the whole flow on loopback, with no AWS account."""

from __future__ import annotations

import argparse
from pathlib import Path

from metaproxy.clihelp import add_flag

MAX_DRAIN_SECONDS = 300


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run STS emulator, broker and sidecars on loopback and show SDKs using them"
    )
    add_flag(
        parser,
        "--policies-dir",
        type=Path,
        default=Path("policies"),
        metavar="DIR",
        help="the tenant policies the demo's broker serves",
    )
    add_flag(
        parser,
        "--state-dir",
        type=Path,
        default=Path("run/demo"),
        metavar="DIR",
        help="keys, tokens, logs and the audit log go here",
    )
    add_flag(
        parser,
        "--state-file",
        type=Path,
        metavar="FILE",
        help="write a JSON description of what runs here (URLs, pids, token files)",
    )
    add_flag(
        parser,
        "--once",
        action="store_true",
        help="exit after the SDK check instead of running until Ctrl-C",
    )
    add_flag(
        parser,
        "--replicas",
        type=_replicas,
        default=1,
        metavar="N",
        unit="count",
        allowed="1 or more",
        help="brokers to run; more than 1 shares a local Valkey/Redis store, sidecars spread "
        "across them (1: one broker, in-process store)",
    )
    add_flag(
        parser,
        "--drain-seconds",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        unit="seconds",
        allowed=f"more than 0, at most {MAX_DRAIN_SECONDS}",
        help="on Ctrl-C, stop sidecars, brokers, store and STS in that order, each group draining"
        " for at most this long",
    )
    parser.set_defaults(func=_run)


def _replicas(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of at least 1")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 < value <= MAX_DRAIN_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{raw!r} must be more than 0 and at most {MAX_DRAIN_SECONDS}"
        )
    return value


def _run(args: argparse.Namespace) -> int:
    from metaproxy.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        args.policies_dir,
        args.state_dir,
        args.state_file,
        args.once,
        args.replicas,
        args.drain_seconds,
    )
    return run_demo(options)
