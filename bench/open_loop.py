"""An open-loop load generator in a process of its own: request n leaves at start + n / rate
whatever the earlier ones are doing, and is timed from that scheduled moment (not from when the
generator got round to sending it), so a generator or a server that falls behind shows in the
latencies instead of silently slowing the arrivals (coordinated omission).

Each request is one new task's first ask for credentials: one POST, on a connection of its own
(a new pod's sidecar has no connection to reuse), one attempt. A 200 whose body holds an access
key, a secret and a session token is a success; anything else (another status, a 200 without
credentials, no answer within the timeout, a connection error) is a failure, recorded by kind.

    python bench/open_loop.py SPEC.json OUT.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

GENERATOR = Path(__file__).resolve()
# Time to set up before the first scheduled send, so the first requests are not late because
# the generator was still building its session.
LEAD_SECONDS = 0.2


@dataclass(frozen=True)
class Answer:
    at: float  # scheduled send, seconds after the first one
    seconds: float  # from the scheduled send to the end of the answer (or the failure)
    outcome: str  # "ok", an HTTP status ("503", "200-without-credentials"), or an error name
    late: float  # how much after its scheduled moment the generator sent it


@dataclass(frozen=True)
class OpenLoopOutcome:
    answers: list[Answer]
    started: float  # time.monotonic() of the first scheduled send (one clock for all processes)
    wall_seconds: float  # the first scheduled send to the last answer
    cpu_seconds: float  # the generator's process CPU (user + system) over that wall time

    @property
    def cpu_share(self) -> float:
        """The generator's CPU over the wall time: 1.0 is one core kept busy throughout."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def ok_seconds(self) -> list[float]:
        return [a.seconds for a in self.answers if a.outcome == "ok"]

    @property
    def failures(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for answer in self.answers:
            if answer.outcome != "ok":
                counts[answer.outcome] = counts.get(answer.outcome, 0) + 1
        return counts


async def run_open_loop(
    work: Path,
    name: str,
    urls: Sequence[str],
    arrivals: Sequence[tuple[int, str]],
    *,
    rate: float,
    timeout: float,
) -> OpenLoopOutcome:
    """Send `arrivals` ((index into `urls`, bearer token), in order) at `rate` a second from a
    generator process; returns once every request has its answer or its timeout."""
    spec, out = work / f"open-loop-{name}.json", work / f"open-loop-{name}-out.json"
    body = {"urls": list(urls), "arrivals": [list(a) for a in arrivals]}
    spec.write_text(json.dumps({**body, "rate": rate, "timeout": timeout}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(GENERATOR), str(spec), str(out)
    )
    if await process.wait() != 0:
        raise RuntimeError(f"load generator exited with {process.returncode}")
    data = json.loads(out.read_text())
    return OpenLoopOutcome(
        answers=[Answer(*row) for row in data["answers"]],
        started=data["started"],
        wall_seconds=data["wall_seconds"],
        cpu_seconds=data["cpu_seconds"],
    )


def has_credentials(body: bytes) -> bool:
    try:
        credentials = json.loads(body)["credentials"]
        fields = ("access_key_id", "secret_access_key", "session_token")
        return all(isinstance(credentials[f], str) and credentials[f] for f in fields)
    except (ValueError, KeyError, TypeError):
        return False


async def _main(spec_path: Path, out_path: Path) -> None:
    spec: dict[str, Any] = json.loads(spec_path.read_text())
    urls: list[str] = [url + "/v1/credentials" for url in spec["urls"]]
    rate: float = spec["rate"]
    answers: list[Answer | None] = [None] * len(spec["arrivals"])
    # force_close: every request on its own connection, closed after the answer.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=spec["timeout"])
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int, url: str, token: str, scheduled: float) -> None:
            late = time.monotonic() - scheduled
            headers = {"Authorization": f"Bearer {token}"}
            try:
                async with session.post(url, json={}, headers=headers) as response:
                    body = await response.read()
                    if response.status != 200:
                        outcome = str(response.status)
                    elif has_credentials(body):
                        outcome = "ok"
                    else:
                        outcome = "200-without-credentials"
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            seconds = time.monotonic() - scheduled
            answers[n] = Answer(scheduled - start, seconds, outcome, late)

        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic() + LEAD_SECONDS
        cpu_before = time.process_time()
        for n, (index, token) in enumerate(spec["arrivals"]):
            scheduled = start + n / rate
            if (delay := scheduled - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n, urls[index], token, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
        wall = time.monotonic() - start
        cpu = time.process_time() - cpu_before
    rows = [[a.at, a.seconds, a.outcome, a.late] for a in answers if a is not None]
    out_path.write_text(
        json.dumps({"answers": rows, "started": start, "wall_seconds": wall, "cpu_seconds": cpu})
    )


if __name__ == "__main__":
    if len(sys.argv) == 3:
        import uvloop

        uvloop.run(_main(Path(sys.argv[1]), Path(sys.argv[2])))
    else:
        sys.exit(__doc__)
