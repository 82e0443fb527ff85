"""IMDSv2 tokens outlive a sidecar restart and are worthless in any other pod.

PyPI's `ec2-metadata` caches its token for six hours and never retries a 401: with a token key
that lived only in the process, a restarted sidecar would leave it failing for hours. The key is
kept in the pod's own memory-backed volume (`--imds-token-key-file`), one per pod.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import stat
from pathlib import Path

import aiohttp
import pytest

from metaproxy.broker.server import BrokerServer
from metaproxy.demo.processes import Child
from metaproxy.errors import ConfigError
from metaproxy.sidecar.tokens import KEY_BYTES, TokenAuthority, load_or_create_key
from tests.support import Pki, issue, start_sidecar_process, wait_ready

REGION = "/latest/meta-data/placement/region"


async def put_token(imds_url: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            imds_url + "/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        ) as answer,
    ):
        assert answer.status == 200
        return await answer.text()


async def get_with(imds_url: str, token: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(imds_url + REGION, headers={"X-aws-ec2-metadata-token": token}) as answer,
    ):
        return answer.status, answer.headers.get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "")


async def pod_sidecar(
    directory: Path, broker: BrokerServer, pki: Pki, task: str, *extra: str
) -> Child:
    directory.mkdir(parents=True, exist_ok=True)
    key = ["--imds-token-key-file", str(directory / "state" / "imds-token.key")]
    child = await start_sidecar_process(
        directory, broker.url, pki, issue(pki, task, "acme"), *key, *extra
    )
    await wait_ready(child.ready["admin_url"])
    return child


async def test_a_token_outlives_a_sidecar_killed_and_restarted(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """A client holding a token keeps working across SIGKILL and restart, with no new PUT."""
    pod = tmp_path / "pod-a"
    first = await pod_sidecar(pod, broker, pki, "tok-a")
    imds = first.ready["imds_urls"][0]
    token = await put_token(imds)
    assert (await get_with(imds, token))[0] == 200
    first.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.process.wait)
    address = imds.removeprefix("http://")
    second = await pod_sidecar(pod, broker, pki, "tok-a", "--imds-listen", address)
    try:
        assert second.ready["imds_urls"][0] == imds  # the same pod, the same address
        status, ttl = await get_with(imds, token)
        assert status == 200
        assert 21000 < int(ttl) <= 21600  # still counting down from the same expiry
    finally:
        await asyncio.to_thread(second.stop)


async def test_a_token_is_worthless_in_another_pod(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """Another pod's sidecar has another key: a token from this pod gets 401 there."""
    mine = await pod_sidecar(tmp_path / "pod-a", broker, pki, "tok-mine")
    theirs = await pod_sidecar(tmp_path / "pod-b", broker, pki, "tok-theirs")
    try:
        token = await put_token(mine.ready["imds_urls"][0])
        assert (await get_with(mine.ready["imds_urls"][0], token))[0] == 200
        assert (await get_with(theirs.ready["imds_urls"][0], token))[0] == 401
    finally:
        await asyncio.gather(asyncio.to_thread(mine.stop), asyncio.to_thread(theirs.stop))


async def test_the_key_file_is_private_and_never_logged(
    broker: BrokerServer, pki: Pki, tmp_path: Path
) -> None:
    """The key is made 0600, is exactly 32 random bytes, and appears in no log line."""
    pod = tmp_path / "pod-k"
    child = await pod_sidecar(pod, broker, pki, "tok-k", "--log-format", "json")
    await asyncio.to_thread(child.stop)
    key_file = pod / "state" / "imds-token.key"
    key = key_file.read_bytes()
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    log = (pod / "sidecar.log").read_bytes()
    for shape in (key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
        assert shape not in log


def test_tokens_verify_across_authorities_with_one_key(tmp_path: Path) -> None:
    """Two authorities built from the same key file (two lives of one sidecar) accept each
    other's tokens; one with a fresh key does not."""
    path = tmp_path / "key"
    minted = TokenAuthority(load_or_create_key(path)).mint(60)
    assert TokenAuthority(load_or_create_key(path)).remaining(minted) in (59, 60)
    assert TokenAuthority().remaining(minted) is None


@pytest.mark.parametrize("bad", ["symlink", "wrong-size", "group-readable", "fifo"])
def test_an_unusable_key_file_is_replaced_never_trusted(tmp_path: Path, bad: str) -> None:
    """A link, a file of the wrong size or mode, or a FIFO at the key's path is replaced by a
    new 0600 key, and a link's target is never read or written."""
    path = tmp_path / "key"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"k" * KEY_BYTES)
    if bad == "symlink":
        path.symlink_to(target)
    elif bad == "wrong-size":
        path.write_bytes(b"short")
        path.chmod(0o600)
    elif bad == "group-readable":
        path.write_bytes(b"g" * KEY_BYTES)
        path.chmod(0o640)
    else:
        os.mkfifo(path, 0o600)
    key = load_or_create_key(path)
    assert key is not None and len(key) == KEY_BYTES
    assert key not in (b"k" * KEY_BYTES, b"g" * KEY_BYTES)
    assert not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert target.read_bytes() == b"k" * KEY_BYTES


def test_a_key_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """The key's folder itself being a link stops the sidecar with one line naming the flag."""
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="--imds-token-key-file"):
        load_or_create_key(tmp_path / "linked" / "key")
