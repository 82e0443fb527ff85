"""The sidecar is a per-pod cost: it runs without a web framework and without the broker's
dependencies, from import to serving (issue 13: aiohttp alone cost every pod about 10 MB)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from metaproxy.broker.server import BrokerServer
from tests.support import Pki, issue, start_sidecar_process, wait_ready

HEAVY = ("aiohttp", "yarl", "multidict", "boto3", "botocore", "moto")


def test_sidecar_modules_import_no_framework() -> None:
    """Parsing the command line and importing the sidecar loads none of the heavy packages."""
    code = (
        "import sys\n"
        "from metaproxy.cli import build_parser\n"
        "build_parser()\n"
        "import metaproxy.sidecar.process, metaproxy.sidecar.cli, metaproxy.process.serve\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


async def test_running_sidecar_maps_no_framework(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """A real `metaproxy sidecar`, after serving credentials and a scrape, has mapped none of
    aiohttp's, yarl's or multidict's extension modules; nor `unicodedata` (the idna codec's,
    which the broker's TLS server name skips) or `_ctypes` (the heap trim's, only after a
    large burst of connections)."""
    token = issue(pki, "t-lean", "acme")
    auth_file = ["--authorization-token-file", str(tmp_path / "lean.auth")]
    child = await start_sidecar_process(tmp_path, broker.url, pki, token, *auth_file)
    try:
        await wait_ready(child.ready["admin_url"])
        auth = (tmp_path / "lean.auth").read_text()
        reader, writer = await asyncio.open_connection(
            *child.ready["container_urls"][0].removeprefix("http://").rsplit(":", 1)
        )
        writer.write(
            f"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
        maps = Path(f"/proc/{child.process.pid}/maps").read_text()
        assert [name for name in HEAVY if f"/{name}/" in maps] == []
        assert [name for name in ("/unicodedata.", "/_ctypes.") if name in maps] == []
    finally:
        await asyncio.to_thread(child.stop)
