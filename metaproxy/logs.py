"""Logging: one named logger per subsystem, JSON lines in production, text on a terminal.

Request id, tenant and task are bound in context variables and added to every record. A final
filter scrubs anything shaped like a JWT or a session token: secrets are never passed to a
logger in the first place, and this makes a mistake visible as `[redacted]` instead of a leak.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Literal

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
task_var: contextvars.ContextVar[str] = contextvars.ContextVar("task", default="")

# JWTs (three base64url parts) and long base64 blobs such as STS session tokens.
_SECRET_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|[A-Za-z0-9+/=]{120,}"
)


def scrub(text: str) -> str:
    return _SECRET_SHAPES.sub("[redacted]", text)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.tenant = tenant_var.get()
        record.task = task_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key in ("request_id", "tenant", "task"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{k}={getattr(record, k)}" for k in ("request_id", "tenant", "task")]
        record.context = " ".join(p for p in parts if not p.endswith("=")) + " "
        return scrub(super().format(record))


def setup_logging(
    log_format: Literal["auto", "json", "text"] = "auto", level: int = logging.INFO
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log is replaced by our own metrics and request logging.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
