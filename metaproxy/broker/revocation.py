"""Revoked tasks and tenants: the broker refuses them credentials. Kept in a small JSON file so a
restarted broker still refuses them."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from metaproxy.clock import Clock, iso_z

log = logging.getLogger("metaproxy.broker.revocation")


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: str  # "task" | "tenant"
    name: str
    at: str  # when it was revoked; sessions issued before this are cut off by an IAM deny


class RevocationList:
    def __init__(self, path: Path | None, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._entries: dict[tuple[str, str], Revocation] = {}
        if path is not None and path.exists():
            for raw in json.loads(path.read_text()):
                entry = Revocation(str(raw["kind"]), str(raw["name"]), str(raw["at"]))
                self._entries[(entry.kind, entry.name)] = entry

    def revoke(self, kind: str, name: str) -> Revocation:
        entry = Revocation(kind, name, iso_z(self._clock.now()))
        self._entries[(kind, name)] = entry
        self._save()
        return entry

    def revoked(self, task: str, tenant: str) -> str:
        for key in (("task", task), ("tenant", tenant)):
            entry = self._entries.get(key)
            if entry is not None:
                return f"{entry.kind} {entry.name} revoked at {entry.at}"
        return ""

    def entries(self) -> list[Revocation]:
        return list(self._entries.values())

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_text(json.dumps([asdict(e) for e in self._entries.values()]))
        os.replace(tmp, self._path)
