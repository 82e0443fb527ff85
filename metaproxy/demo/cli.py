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
    parser.set_defaults(func=_run)


def _replicas(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of at least 1")
    return int(raw)


def _run(args: argparse.Namespace) -> int:
    import signal

    from metaproxy.demo.run import DemoOptions, run_demo

    # Block SIGINT/SIGTERM so the demo waits for them with sigwait and still cleans up.
    if not args.once:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    options = DemoOptions(
        args.policies_dir, args.state_dir, args.state_file, args.once, args.replicas
    )
    return run_demo(options)
