"""The policy set in force, reloaded on change; a bad edit never replaces the last good set.

A control plane that dropped its known-good state on a bad update took traffic down with it,
so a reload that finds any problem logs every one of them and keeps serving the previous set.
A file caught mid-write once loaded because its first half parsed (and a `web` task got
`acme-reports`), so the watcher loads only a directory that read the same twice, a poll apart;
a file cut short that stays so is refused by its missing end line (`complete.py`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Collection
from pathlib import Path

from metaproxy.policy.load import load_policy_dir
from metaproxy.policy.model import PolicySet
from metaproxy.policy.problems import PolicyError, PolicyProblem
from metaproxy.policy.read import PolicySnapshot, policy_files, read_policy_dir

log = logging.getLogger("metaproxy.policy")

Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyStore:
    """Holds the current PolicySet; `generation` counts successful reloads."""

    def __init__(self, directory: Path, kubernetes_issuers: Collection[str] = ()) -> None:
        self.directory = directory
        # With several clusters trusted, every Kubernetes rule must name its own (load.py).
        self.kubernetes_issuers = tuple(kubernetes_issuers)
        # Reloads come from the watcher (in a worker thread) and from SIGHUP (on the loop).
        self._lock = threading.Lock()
        self._fingerprint = self._scan()
        # PolicyError: the broker refuses to start.
        self._current = load_policy_dir(directory, kubernetes_issuers=self.kubernetes_issuers)
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

    def reload(
        self, snapshot: PolicySnapshot | None = None, fingerprint: Fingerprint | None = None
    ) -> list[PolicyProblem]:
        """Load the directory again (or `snapshot`, read after `fingerprint` was taken); [] means
        the new set is in force, else the old one stays."""
        with self._lock:
            # Taken before reading, so an edit landing during the load is seen by the next poll.
            self._fingerprint = self._scan() if fingerprint is None else fingerprint
            try:
                fresh = load_policy_dir(
                    self.directory,
                    kubernetes_issuers=self.kubernetes_issuers,
                    snapshot=snapshot,
                )
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

    async def settled(self, interval: float) -> tuple[PolicySnapshot, Fingerprint] | None:
        """The directory's contents if two reads `interval` apart match, else None (a writer is
        still at work: the caller tries again at its next poll)."""
        fingerprint = self._scan()
        # File reads stay off the event loop.
        first = await asyncio.to_thread(read_policy_dir, self.directory)
        await asyncio.sleep(interval)
        second = await asyncio.to_thread(read_policy_dir, self.directory)
        if first != second:
            log.info("policy files still changing; reloading once they are stable")
            return None
        return second, fingerprint

    async def watch(self, interval: float) -> None:
        """Poll for changes and reload once the whole set is stable; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if not self.changed():
                continue
            try:
                stable = await self.settled(interval)
                if stable is not None:
                    await asyncio.to_thread(self.reload, *stable)
            except Exception:
                # A watcher that dies silently would freeze policy at its last state forever.
                log.exception("policy reload failed; keeping digest %s", self._current.digest)
