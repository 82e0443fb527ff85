"""Logging: one named logger per subsystem, JSON lines in production, text on a terminal.

Request id, tenant and task are bound in context variables and added to every record. The
formatters redact anything shaped like a secret (`redact.py`, the audit records' rule too):
secrets are never passed to a logger in the first place, and this makes a mistake visible as
`[redacted]` instead of a leak.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Literal

from metaproxy.redact import redact

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
task_var: contextvars.ContextVar[str] = contextvars.ContextVar("task", default="")

# C0 and C1 controls, DEL, and the characters that reorder or break lines on a terminal (bidi
# overrides and isolates, line and paragraph separators).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x1b`, `\\u202e`): a client's
    string written to a text log or an operator's terminal cannot forge a line, move the
    cursor (U+009B is CSI) or reverse what follows."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    escaped = repr(char)[1:-1]
    return escaped if escaped != char else f"\\u{ord(char):04x}"


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
            "message": redact(record.getMessage()),
        }
        for key in ("request_id", "tenant", "task"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{k}={getattr(record, k)}" for k in ("request_id", "tenant", "task")]
        record.context = " ".join(p for p in parts if not p.endswith("=")) + " "
        return redact(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: request strings in a message cannot forge another record. (The
        # traceback, appended after this, keeps its own lines.)
        record.message = printable(record.message)
        return super().formatMessage(record)


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
