"""The sidecar's hot path against the stack limit's, in one process, on CPU time: what one cached
answer costs each, in microseconds, without the machine's noise or a load generator.

`bench/sidecar.py` measures rates over sockets, which the other work on a shared machine skews;
this measures the same two protocols' Python side alone. A real sidecar (`Sidecar`, its broker
and an STS emulator as in `bench/sidecar.py`, the credentials fetched) runs in this process on
uvloop; its connections (`--connections`, 50 as wrk's) are built by the same factories its
listeners use (connection guard, `http1.HttpProtocol`, the face's data-plane handler), each
handed a stand-in transport whose `write` is a C builtin (`deque.append`, which keeps the last
answer). The request is what wrk sends (`Host`, the IMDS token on the IMDS face), `--depth`
copies per read as the bench pipelines them; reads go to the connections in turn, as wrk's
arrive, `--requests` requests in all, and `time.process_time` over the whole loop, divided by
the requests, is the cost of one (taking turns matters: what a connection keeps of its last
request is then no help to the next). The stack limit
(`bench/stack_limit.AnswerProtocol`, the sidecar's own answer captured first) is fed the same
reads the same way. Each figure is the least of `--repeats` runs (the noise only adds).

Left out of both alike: the event loop's reading and the kernel's send and receive, which
`bench/sidecar.py`'s rates include. So `ratio` here (stack limit's µs over the sidecar's) is
lower than the bench's `ratio_to_stack_limit`: the same Python cost stands over a smaller
common part.

    .venv/bin/python bench/sidecar_hotpath.py [--requests 200000] [--depth 4] [--profile FACE]

`--profile imds|container` prints cProfile's view of the sidecar's part instead (tottime).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import stack_limit  # noqa: E402
from bench.sidecar import bench_policies  # noqa: E402
from metaproxy.demo.local import (  # noqa: E402
    AUDIENCE,
    EMULATOR_CREDENTIALS,
    ISSUER,
    broker_args,
    make_local_keys,
    sidecar_args,
)
from metaproxy.demo.processes import start_metaproxy  # noqa: E402

PEER = ("127.0.0.1", 40000)


class Transport:
    """What a protocol needs of a uvloop transport; `write` keeps the last answer only."""

    def __init__(self) -> None:
        self.written: collections.deque[bytes] = collections.deque(maxlen=1)
        self.write = self.written.append
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def drive(
    make: Callable[[], asyncio.Protocol], data: bytes, reads: int, connections: int
) -> tuple[float, bytes]:
    """CPU seconds for `reads` reads of `data`, taking turns over `connections` connections
    (as wrk's arrive), and the last answer written."""
    opened = [(make(), Transport()) for _ in range(connections)]
    for protocol, transport in opened:
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(data)  # the first read teaches the sidecar the request
    turns = [protocol.data_received for protocol, _ in opened] * (reads // connections + 1)
    started = time.process_time()
    for feed in turns[:reads]:
        feed(data)
    spent = time.process_time() - started
    for protocol, transport in opened:
        if transport.closed:
            raise RuntimeError("a connection was closed")
        if not transport.written[-1].startswith(b"HTTP/1.1 200 "):
            # Refused (the pod's rate limit, say): the figure would be a refusal's cost.
            raise RuntimeError(f"the server answered {transport.written[-1][:80]!r}")
        protocol.connection_lost(None)
    return spent, opened[0][1].written[-1]


def request_bytes(path: str, headers: dict[str, str]) -> bytes:
    """As wrk formats it: request line, Host, the headers given."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1:8080"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def measure(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    from metaproxy.sidecar import container_creds, imds
    from metaproxy.sidecar.app import data_plane
    from metaproxy.sidecar.process import Sidecar
    from metaproxy.sidecar.wire import http1

    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        state = sidecar.state
        for _ in range(500):
            if state.keeper.serving() is not None:
                break
            await asyncio.sleep(0.02)
        grant = state.keeper.serving()
        if grant is None:
            raise RuntimeError("the sidecar got no credentials")
        token = state.tokens.mint(21600)
        faces = {
            "imds": (
                imds.FACE,
                f"/latest/meta-data/iam/security-credentials/{grant.role_name}",
                {"X-aws-ec2-metadata-token": token},
            ),
            "container": (container_creds.FACE, config.container_credentials_path, {}),
        }
        results: dict[str, Any] = {}
        for name, (face, path, headers) in faces.items():

            def sidecar_protocol(face: Any = face) -> asyncio.Protocol:
                plane = data_plane(state, face, "127.0.0.1:0")
                inner = http1.protocol_factory(
                    plane.handle, sidecar.tracker, face.error_page, face.server, plane.repeats
                )
                return sidecar.guard.protocol_factory(inner, face.refuse_connection)()

            data = request_bytes(path, headers) * args.depth
            reads = args.requests // args.depth
            _, answer = drive(sidecar_protocol, data, 10, 1)
            if not answer.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"the sidecar answered {answer[:80]!r}")
            if args.profile == name:
                profile(sidecar_protocol, data, reads, args.connections)
                continue
            captured = stack_limit.Answer(answer)

            def limit_protocol(captured: stack_limit.Answer = captured) -> asyncio.Protocol:
                return stack_limit.AnswerProtocol(captured)

            figures: dict[str, float] = {}
            for server, make in (("sidecar", sidecar_protocol), ("stack_limit", limit_protocol)):
                runs = [drive(make, data, reads, args.connections) for _ in range(args.repeats)]
                best = min(spent for spent, _ in runs)
                figures[server] = best / (reads * args.depth) * 1e6
            results[name] = {
                "sidecar_us": round(figures["sidecar"], 3),
                "stack_limit_us": round(figures["stack_limit"], 3),
                "extra_us": round(figures["sidecar"] - figures["stack_limit"], 3),
                "ratio": round(figures["stack_limit"] / figures["sidecar"], 3),
            }
        return results
    finally:
        await sidecar.aclose()


def profile(
    make: Callable[[], asyncio.Protocol], data: bytes, reads: int, connections: int
) -> None:
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    drive(make, data, reads, connections)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def unlimited(policies: Path) -> Path:
    """`bench/sidecar.py`'s policies with the sidecar's rates a thousand times higher: a
    million requests a second with a burst of a million, which this bench's millions of
    requests in a few seconds would exhaust (every request still takes its token)."""
    for policy in policies.glob("*.toml"):
        policy.write_text(policy.read_text().replace("1000000", "1000000000"))
    return policies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--depth", type=int, default=4, help="requests per read (pipelined)")
    parser.add_argument("--connections", type=int, default=50, help="taking turns, as wrk's")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the least wins")
    parser.add_argument("--profile", choices=("imds", "container"))
    args = parser.parse_args()

    import uvloop

    from metaproxy.cli import build_parser
    from metaproxy.config import build_config
    from metaproxy.identity.issue import issue_token
    from metaproxy.sidecar.config import SidecarConfig
    from metaproxy.testing.emulator import StsEmulator

    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as name, StsEmulator() as emulator:
        tmp = Path(name)
        keys = make_local_keys(tmp / "keys")
        broker = start_metaproxy(
            "broker",
            broker_args(
                keys,
                policies_dir=unlimited(bench_policies(tmp / "policies")),
                audit_dir=tmp / "audit",
                sts_endpoint=emulator.url,
                instance="bench-hotpath",
            ),
            ready_file=tmp / "broker.ready",
            log_file=tmp / "broker.log",
            env=EMULATOR_CREDENTIALS,
        )
        try:
            identity = tmp / "identity.jwt"
            identity.write_text(
                issue_token(
                    keys.identity_key,
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    task="bench-hotpath",
                    tenant="acme",
                    ttl=7200,
                )
            )
            argv = sidecar_args(
                keys,
                broker_url=broker.ready["url"],
                identity_file=identity,
                authorization_file=tmp / "sidecar.auth",
            )
            argv += ["--container-credentials-path", "/v2/credentials/" + "x" * 32]
            argv += ["--imds-token-key-file", str(tmp / "imds-token.key")]
            config = build_config(SidecarConfig, build_parser("sidecar").parse_args(argv))
            results = uvloop.run(measure(args, config))
        finally:
            broker.stop()
    for face, figures in results.items():
        print(
            f"{face:9}  sidecar {figures['sidecar_us']:6.3f} µs/request  "
            f"stack limit {figures['stack_limit_us']:6.3f}  "
            f"extra {figures['extra_us']:6.3f}  ratio {figures['ratio']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
