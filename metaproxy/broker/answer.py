"""What the broker hands a sidecar for an issued credential set, as a value and as JSON.

The issuer returns a frozen `Issued`; the HTTP handler turns it into the body with `Answers`,
which adds the task's signed metadata view (cached: signing is cheap but not free, and the view
only changes with its inputs).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from metaproxy.broker.authenticator import RequestContext
from metaproxy.broker.credentials.source import Fetched
from metaproxy.broker.metadata import build_metadata
from metaproxy.clock import Clock, iso_z
from metaproxy.models import Decision, Identity, NodeFacts

_ACCOUNT = re.compile(r":iam::(\d{12}):")
MAX_VIEWS = 10_000


@dataclass(frozen=True, slots=True)
class Issued:
    """One credential request's answer: who, what policy decided, the set and where it came
    from (`fetched.origin`, for the metrics), and where the task runs (its sidecar's word)."""

    ctx: RequestContext
    identity: Identity
    decision: Decision
    fetched: Fetched
    node: NodeFacts | None = None

    @property
    def account_id(self) -> str:
        found = _ACCOUNT.search(self.decision.role_arn)
        return found.group(1) if found else ""


class Answers:
    """Renders `Issued` values in this broker's region and zone, with its document key."""

    def __init__(
        self, clock: Clock, *, region: str, availability_zone: str, document_key: Path | None
    ) -> None:
        self._region = region
        self._availability_zone = availability_zone
        self._document_key = document_key
        self._started: datetime = clock.now()
        self._views: OrderedDict[tuple[object, ...], dict[str, Any]] = OrderedDict()

    def render(self, issued: Issued) -> dict[str, Any]:
        decision, identity = issued.decision, issued.identity
        role, credentials = issued.fetched.role, issued.fetched.role.credentials
        return {
            "request_id": issued.ctx.request_id,
            "tenant": decision.tenant,
            "task": identity.task,
            "role_name": decision.role_name,
            "role_arn": decision.role_arn,
            "assumed_role_arn": role.assumed_role_arn,
            "account_id": issued.account_id,
            "credentials": {
                "access_key_id": credentials.access_key_id,
                "secret_access_key": credentials.secret_access_key,
                "session_token": credentials.session_token,
                "expiration": iso_z(credentials.expiration),
                "issued_at": iso_z(issued.fetched.fetched_at),
            },
            "metadata": self._metadata_view(issued),
            "limits": decision.sidecar_limits.to_json(),
        }

    def _metadata_view(self, issued: Issued) -> dict[str, Any]:
        decision, identity = issued.decision, issued.identity
        key = (
            decision.tenant,
            identity.task,
            decision.role_name,
            issued.account_id,
            issued.ctx.peer,
            issued.node,
        )
        view = self._views.get(key)
        if view is None:
            view = build_metadata(
                identity=identity,
                decision=decision,
                account_id=issued.account_id,
                region=self._region,
                availability_zone=self._availability_zone,
                peer=issued.ctx.peer,
                started=self._started,
                document_key=self._document_key,
                node=issued.node,
            )
            self._views[key] = view
            if len(self._views) > MAX_VIEWS:
                self._views.popitem(last=False)
        return view
