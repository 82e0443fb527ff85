"""Is 169.254.169.254 this pod's own sidecar? Checked before the pod may start, and again later.

In link-local mode (the webhook's default) the pod's applications get no endpoint variables for
IMDS: tools that hard-code 169.254.169.254 rely on the pod's network namespace sending that
address to this sidecar (metaproxy's CNI plugin, or its init container). On a node where the
plugin is missing or was removed, the address would lead to the node's IMDS — the node's role,
if the node allows it. So with `--link-local-check` the sidecar is not ready (and the kubelet
does not start the application) until a token fetched from 169.254.169.254 is one this sidecar
signed: only this sidecar holds the pod's token key, so nothing else can answer that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from metaproxy.config import IMDS_ADDRESS, split_host_port
from metaproxy.sidecar.tokens import TokenAuthority
from metaproxy.sidecar.wire.httpclient import Endpoint, HttpClient, HttpClientError

log = logging.getLogger("metaproxy.sidecar.link_local")

RETRY_SECONDS = 0.5  # until it holds; then re-checked now and then
RECHECK_SECONDS = 60.0
NOT_CHECKED = "checking that 169.254.169.254 reaches this sidecar"


class LinkLocalCheck:
    """`problem` is "" once 169.254.169.254:80 answers with this sidecar's own tokens."""

    def __init__(self, tokens: TokenAuthority, address: str = IMDS_ADDRESS) -> None:
        host, port = split_host_port(address)
        self._address = address
        self._http = HttpClient(Endpoint(host, port), max_answer_bytes=4096)
        self._tokens = tokens
        self.problem = NOT_CHECKED
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="link-local-check")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    async def check(self) -> str:
        """One check; returns the problem ("" when the address is this sidecar)."""
        try:
            async with asyncio.timeout(1.0):
                answer = await self._http.request(
                    "PUT",
                    "/latest/api/token",
                    {"X-aws-ec2-metadata-token-ttl-seconds": "5", "Connection": "close"},
                )
        except (OSError, HttpClientError, TimeoutError) as exc:
            self._http.close()
            return (
                f"{self._address} does not reach this sidecar ({type(exc).__name__}): the "
                "pod's network namespace was not prepared (metaproxy's CNI plugin on this "
                "node, or the link-local init container; docs/link-local.md)"
            )
        token = answer.body.decode("ascii", "replace")
        if answer.status != 200 or self._tokens.remaining(token) is None:
            return (
                f"{self._address} answers, but not with this sidecar's tokens "
                f"({answer.status}): something else holds the metadata address in this pod "
                "(the node's IMDS? docs/link-local.md)"
            )
        return ""

    async def _run(self) -> None:
        while True:
            problem = await self.check()
            if problem != self.problem:
                if problem:
                    log.warning("not ready: %s", problem)
                elif self.problem != NOT_CHECKED:
                    log.info("%s reaches this sidecar again", self._address)
            self.problem = problem
            await asyncio.sleep(RECHECK_SECONDS if not problem else RETRY_SECONDS)
