"""Store URLs → redis-py asyncio clients (hiredis parses the replies when it is installed).

- `redis://[user:password@]host:port[/db]` and `rediss://…` (TLS; `?ssl_ca_certs=FILE` names
  the CA bundle, `?ssl_cert_reqs=required` is the default): one server, or a managed endpoint
  (ElastiCache, MemoryDB's primary endpoint).
- `redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/db]` (and
  `rediss+sentinel://`): the primary that Sentinel names for SERVICE, followed on failover.
- `redis+cluster://[user:password@]host:port[,host:port…]` (and `rediss+cluster://`): a Redis or
  Valkey cluster; every key a script touches shares one hash tag, so scripts stay in one slot.

Two clients come back: one for commands and one for pub/sub (Cluster delivers a PUBLISH to
every node, so one node's connection hears the whole fleet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from metaproxy.errors import ConfigError

Topology = Literal["single", "sentinel", "cluster"]
SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True, slots=True)
class StoreUrl:
    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    service: str  # sentinel only
    db: int
    query: str

    def redacted(self) -> str:
        """For logs: the URL without its password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        user = f"{self.username or ''}:***@" if self.password else ""
        scheme = next(s for s, v in SCHEMES.items() if v == (self.topology, self.tls))
        return f"{scheme}://{user}{hosts}"


def parse_store_url(url: str) -> StoreUrl:
    """Validate a `--store` URL; every problem is one ConfigError naming the flag."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES or not rest:
        raise ConfigError(
            f"store: {_safe(url)!r} must be memory, redis://, rediss://, redis+sentinel:// "
            "or redis+cluster:// (rediss+… for TLS)"
        )
    topology, tls = SCHEMES[scheme]
    # urlsplit reads one host:port; the host list is split by hand.
    parts = urlsplit("redis://" + rest)
    netloc = parts.netloc
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379" if topology != "sentinel" else "26379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"store: {item.strip()!r} in the URL is not HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if topology == "sentinel":
        if not path:
            raise ConfigError("store: a redis+sentinel:// URL names the service: …/SERVICE[/db]")
        service, path = path[0], path[1:]
    if path:
        if len(path) > 1 or not path[0].isdigit():
            raise ConfigError(f"store: {parts.path!r} is not a database number")
        db = int(path[0])
    if topology == "single" and len(hosts) > 1:
        raise ConfigError("store: a redis:// URL names one host; use redis+sentinel/cluster")
    return StoreUrl(topology, tls, tuple(hosts), username, password, service, db, parts.query)


def _safe(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url[:40]


def _single_url(store: StoreUrl, host: tuple[str, int]) -> str:
    auth = ""
    if store.password or store.username:
        auth = f"{store.username or ''}:{store.password or ''}@"
    query = f"?{store.query}" if store.query else ""
    return f"{'rediss' if store.tls else 'redis'}://{auth}{host[0]}:{host[1]}/{store.db}{query}"


def connect(store: StoreUrl, *, timeout: float) -> tuple[Any, Any]:
    """(command client, pub/sub client). Nothing is connected until the first command."""
    from redis.asyncio import Redis

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
        "decode_responses": False,
    }
    # Pub/sub waits for messages for as long as it takes: no read timeout on its socket.
    pubsub_options = {**options, "socket_timeout": None}
    if store.topology == "single":
        url = _single_url(store, store.hosts[0])
        return (
            Redis.from_url(url, **options),
            Redis.from_url(url, **pubsub_options),
        )
    if store.topology == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        url = _single_url(store, store.hosts[0])
        commands = RedisCluster.from_url(
            url,
            startup_nodes=[ClusterNode(h, p) for h, p in store.hosts],
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return commands, Redis.from_url(url, **pubsub_options)
    from redis.asyncio.sentinel import Sentinel

    auth = {"username": store.username, "password": store.password}
    sentinel = Sentinel(
        list(store.hosts),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **auth},
        ssl=store.tls,
        username=store.username,
        password=store.password,
    )
    return (
        sentinel.master_for(store.service, db=store.db, **options),
        sentinel.master_for(store.service, db=store.db, **pubsub_options),
    )
