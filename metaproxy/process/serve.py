"""`serve(root)`: how every long-running process runs, once.

A process's command is: parse the flags, build the frozen config, `serve(root)`, where `root` is
the process's composition root (`metaproxy.sidecar.process.Sidecar`,
`metaproxy.webhook.process.Webhook`, `metaproxy.broker.server.BrokerServer`). `serve` owns what
every process shares and none should copy: the event loop (uvloop), SIGTERM/SIGINT → drain →
close, SIGHUP → reload, the ready file, the drain cap, and one line instead of a traceback for
ordinary mistakes (a file that cannot be read, a port in use: `--admin-listen: cannot listen on
127.0.0.1:9902: address already in use`).

The protocol a root keeps (`Root`), in the order `serve` uses it:

    async with root:                 # start every part in order; listening once entered
        root.ready()                 # what the ready file says besides the pid: the bound URLs
        await root.drain(deadline)   # SIGTERM or SIGINT: stop taking work, finish what is in flight
                                     # leaving: close every part in the reverse of its start

- `__aenter__` starts the parts in start order and returns once the process serves; if a part
  fails to start, the parts started before it are closed before the error propagates (build the
  root on a `contextlib.AsyncExitStack` and both come free).
- `drain(deadline)` is the gentle part of stopping: readiness turns false, listeners close,
  in-flight requests finish. `deadline` is loop time (`config.drain_seconds` after the signal);
  `serve` cancels the drain there, so a root plans within it and never needs its own cap.
- `__aexit__` closes whatever is left, promptly, in reverse start order: after a complete drain,
  after one cut at the cap, and after none (tests close a root without draining it).
- `config` is the frozen config: `drain_seconds` is the cap, `log_format` the log's, and its
  fields name the flag of a port that is in use.
- `reload()`, only for a root that has something to reload (`Reloads`): SIGHUP. Without it
  SIGHUP keeps its default action.

Components inside a root keep the same two words, `start()` (plain or async) and `aclose()`;
`started(parts, component)` starts one and has the root's exit stack close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

from metaproxy.config import ServerConfig

log = logging.getLogger("metaproxy.process")

# asyncio and uvloop both name the address in a failed bind: "... bind on address
# ('127.0.0.1', 8443): address already in use".
_BIND_ADDRESS = re.compile(r"\('?\[?([^',\]]*)\]?'?, (\d+)\)")
_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


class ProcessConfig(ServerConfig, Protocol):
    """What `serve` reads of a root's config."""

    @property
    def drain_seconds(self) -> float: ...


class Root(Protocol):
    """A process's composition root (see the module's docstring)."""

    @property
    def config(self) -> ProcessConfig: ...

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def ready(self) -> Mapping[str, object]: ...

    async def drain(self, deadline: float) -> None: ...


@runtime_checkable
class Reloads(Protocol):
    """A root with something to reload on SIGHUP (a rotated certificate, policies)."""

    def reload(self) -> None: ...


class Component(Protocol):
    def start(self) -> Awaitable[None] | None: ...

    async def aclose(self) -> None: ...


P = TypeVar("P", bound=Component)


async def started(parts: contextlib.AsyncExitStack, component: P) -> P:
    """`component`, started, with its `aclose` on `parts`: closed before everything started
    earlier."""
    starting = component.start()
    if inspect.isawaitable(starting):
        await starting
    parts.push_async_callback(component.aclose)
    return component


def serve(root: Root, *, ready_file: Path | None = None) -> int:
    """Run `root` until SIGTERM or SIGINT, drain it (at most `config.drain_seconds`), close it;
    the exit status."""
    return run_process(root.config, lambda: _lifetime(root, ready_file))


async def _lifetime(root: Root, ready_file: Path | None) -> int:
    lifecycle = Lifecycle()
    async with root:
        lifecycle.install(on_reload=root.reload if isinstance(root, Reloads) else None)
        if ready_file is not None:
            write_ready_file(ready_file, {**root.ready(), "pid": os.getpid()})
        await lifecycle.wait()
        cap = root.config.drain_seconds
        log.info("draining (at most %.1fs)", cap)
        deadline = asyncio.get_running_loop().time() + cap
        try:
            async with asyncio.timeout_at(deadline):
                await root.drain(deadline)
        except TimeoutError:
            log.info("drain cut at %.1fs; closing", cap)
    return 0


def run_process(config: ServerConfig, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """The start every server command shares: the files it reads checked, logging set up, then
    `main()` on the event loop; a port in use ends as one line naming its flag."""
    from metaproxy.config import readable_paths
    from metaproxy.errors import StartError
    from metaproxy.logs import setup_logging

    readable_paths(config)
    setup_logging(config.log_format)
    try:
        return run(main())
    except OSError as exc:
        if exc.errno not in _LISTEN_ERRNOS:
            raise
        raise StartError(describe_listen_error(exc, config)) from None


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when available: it halves per-request overhead for small responses."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    result: int = uvloop.run(main)
    return result


class Lifecycle:
    """SIGTERM/SIGINT start a drain; SIGHUP calls a reload hook."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    def install(self, on_reload: Callable[[], object] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, on_reload)

    async def wait(self) -> None:
        await self.stopping.wait()


def write_ready_file(path: Path, data: Mapping[str, object]) -> None:
    """Atomically, so a watcher never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def describe_listen_error(exc: OSError, config: Any) -> str:
    """`--admin-listen: cannot listen on 127.0.0.1:9902: address already in use`."""
    # asyncio puts its own sentence in strerror; the errno's text is the reason.
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    match = _BIND_ADDRESS.search(str(exc))
    if match is None:
        return f"cannot listen: {reason}"
    host, port = match.group(1), match.group(2)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for address in value if isinstance(value, tuple) else (value,):
            if isinstance(address, str) and address.endswith(f":{port}") and host in address:
                flag = "--" + f.name.replace("_", "-")
                return f"{flag}: cannot listen on {address}: {reason}"
    return f"cannot listen on {host}:{port}: {reason}"
