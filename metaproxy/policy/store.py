"""The policy set in force, reloaded on change; a bad edit never replaces the last good set.

A control plane that dropped its known-good state on a bad update took traffic down with it,
so a reload that finds any problem logs every one of them and keeps serving the previous set.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from metaproxy.policy.load import PolicyError, PolicyProblem, load_policy_dir, policy_files
from metaproxy.policy.model import PolicySet

log = logging.getLogger("metaproxy.policy")

Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyStore:
    """Holds the current PolicySet; `generation` counts successful reloads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Reloads come from the watcher (in a worker thread) and from SIGHUP (on the loop).
        self._lock = threading.Lock()
        self._fingerprint = self._scan()
        self._current = load_policy_dir(directory)  # PolicyError: the broker refuses to start
        self.generation = 0
        log.info(
            "policy loaded: %d tenants, digest %s",
            len(self._current.tenants),
            self._current.digest,
        )

    @property
    def current(self) -> PolicySet:
        return self._current

    def _scan(self) -> Fingerprint:
        """Names, sizes and mtimes of the policy files: cheap enough to poll every second."""
        entries = []
        try:
            for file in policy_files(self.directory):
                try:
                    stat = file.stat()
                except OSError:
                    continue  # removed between listing and stat; the next scan sees it
                entries.append((file.name, stat.st_mtime_ns, stat.st_size))
        except OSError:
            return ()
        return tuple(sorted(entries))

    def changed(self) -> bool:
        return self._scan() != self._fingerprint

    def reload(self) -> list[PolicyProblem]:
        """Load the directory again; [] means the new set is in force, else the old one stays."""
        with self._lock:
            # Taken before reading, so an edit landing during the load is seen by the next poll.
            self._fingerprint = self._scan()
            try:
                fresh = load_policy_dir(self.directory)
            except PolicyError as exc:
                log.error(
                    "policy reload refused, %d problems; keeping digest %s",
                    len(exc.problems),
                    self._current.digest,
                )
                for problem in exc.problems:
                    log.error("policy problem: %s", problem)
                return exc.problems
            self._current = fresh
            self.generation += 1
            log.info(
                "policy reloaded: generation %d, %d tenants, digest %s",
                self.generation,
                len(fresh.tenants),
                fresh.digest,
            )
            return []

    async def watch(self, interval: float) -> None:
        """Poll for changes and reload; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if not self.changed():
                continue
            try:
                # File reads stay off the event loop.
                await asyncio.to_thread(self.reload)
            except Exception:
                # A watcher that dies silently would freeze policy at its last state forever.
                log.exception("policy reload failed; keeping digest %s", self._current.digest)
