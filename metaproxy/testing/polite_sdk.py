"""A well-behaved SDK, as a process of its own: every 200 ms, an IMDSv2 token, the role
listing and the role's credentials, each on a new connection, as botocore does at start-up.

    python -m metaproxy.testing.polite_sdk HOST PORT SECONDS [SOURCE_ADDRESS]

Prints one JSON list: [succeeded, seconds] for each fetch. The fairness test and the sidecar
bench run it beside a flood from the same pod address (SOURCE_ADDRESS) and count its successes.
Standard library only, so it starts in a few milliseconds and costs the sidecar nothing.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

CREDENTIALS = "/latest/meta-data/iam/security-credentials/"
PERIOD_SECONDS = 0.2


def fetch(host: str, port: int, source: str) -> bool:
    def ask(method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        conn = http.client.HTTPConnection(host, port, timeout=1.0, source_address=(source, 0))
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    status, token = ask("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    if status != 200:
        return False
    status, role = ask("GET", CREDENTIALS, {"X-aws-ec2-metadata-token": token})
    if status != 200:
        return False
    status, body = ask("GET", CREDENTIALS + role, {"X-aws-ec2-metadata-token": token})
    return status == 200 and bool(json.loads(body)["Code"] == "Success")


def main(argv: list[str]) -> int:
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    source = argv[3] if len(argv) > 3 else host
    results: list[list[object]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            ok = fetch(host, port, source)
        except (OSError, ValueError, KeyError):
            ok = False
        elapsed = time.monotonic() - started
        results.append([ok, elapsed])
        time.sleep(max(0.0, PERIOD_SECONDS - elapsed))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
