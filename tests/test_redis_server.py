"""The store the fleet's tests run on: a real Valkey/Redis on loopback that keeps its AOF."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from metaproxy.testing.redis_server import RedisServer
from tests.conftest import require_redis_server


def test_start_answers_ping_at_the_url_it_returns(redis_server: RedisServer) -> None:
    """The URL is loopback, database 0, and a client there gets PONG."""
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True


def test_a_key_survives_a_clean_restart_on_the_same_url(redis_server: RedisServer) -> None:
    """stop() lets the server fsync its AOF; restart() replays it on the same port."""
    url, pid = redis_server.url, redis_server.pid
    with redis.Redis.from_url(url) as client:
        client.set("revocation:acme", "2026-01-01T00:00:00Z")
    assert redis_server.restart() == url
    assert redis_server.pid != pid
    with redis.Redis.from_url(url) as client:
        assert client.get("revocation:acme") == b"2026-01-01T00:00:00Z"


def test_kill_keeps_keys_written_more_than_a_second_before(redis_server: RedisServer) -> None:
    """appendfsync everysec: a SIGKILL loses at most the last second of writes."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("old", "kept")
        time.sleep(1.2)
    redis_server.kill()
    assert not redis_server.running
    redis_server.restart()
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.get("old") == b"kept"


def test_a_password_is_required_and_carried_in_the_url(tmp_path: Path) -> None:
    """With requirepass, the URL holds the (quoted) password and a client without it is refused."""
    server = RedisServer(tmp_path / "redis", password="s3cret/pw", binary=require_redis_server())
    url = server.start()
    try:
        assert url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            assert client.ping() is True
        with (
            redis.Redis(host="127.0.0.1", port=server.port) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
    finally:
        server.stop()
