"""`metaproxy demo`: the whole flow on loopback, with no AWS account."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run STS emulator, broker and sidecars on loopback and show SDKs using them"
    )
    parser.add_argument("--policies-dir", type=Path, default=Path("policies"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("run/demo"),
        help="keys, tokens, logs and the audit log go here",
    )
    parser.add_argument("--state-file", type=Path, help="write a JSON description of what runs")
    parser.add_argument("--once", action="store_true", help="exit after the check")
    parser.add_argument(
        "--replicas",
        type=_replicas,
        default=1,
        metavar="N",
        help="run N brokers sharing a local Valkey/Redis store, sidecars spread across them"
        " (default 1: one broker, in-process store)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on Ctrl-C, stop sidecars, brokers, store and STS in that order, each group draining"
        " for at most this long (default 5)",
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
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{raw!r} must be more than 0 and at most 300")
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
