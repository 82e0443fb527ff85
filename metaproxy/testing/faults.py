"""The faults the fault proxy can inject, checked, and the STS error answers it gives.

`Faults` is the value in force; `validate_faults` checks a change from a test, the admin API
or the command line, so that one rule refuses `{"latency": true}` or a fraction of 2 wherever
it comes from. The errors are STS's own XML, so the broker meets them as it would meet AWS:
through botocore's parsing of a real answer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from aiohttp import web

Mode = Literal["pass", "refuse", "blackhole", "reset"]
MODES: tuple[str, ...] = get_args(Mode)
MAX_DELAY_SECONDS = 3600.0
_ERROR_CODE = re.compile(r"^[A-Za-z]{0,64}$")

STS_ERROR_XML = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
    "<Error><Type>{type}</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>{request_id}</RequestId></ErrorResponse>"
)


@dataclass(frozen=True)
class Faults:
    """The faults in force. Throttling and errors apply to `AssumeRole` calls only."""

    latency: float = 0.0
    jitter: float = 0.0
    # Drawn independently: error_fraction applies to the calls that were not throttled.
    throttle_fraction: float = 0.0
    error_fraction: float = 0.0
    mode: Mode = "pass"
    # Answer every AssumeRole with this STS error code (400, Sender) instead of forwarding it,
    # e.g. PackedPolicyTooLarge; empty: forward.
    refuse_code: str = ""


def _number(key: str, value: object, upper: float) -> float:
    # bool is an int subclass; `{"latency": true}` is a client bug, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not 0.0 <= value <= upper:
        raise ValueError(f"{key} must be between 0 and {upper:g}")
    return float(value)


def validate_faults(changes: Mapping[str, object]) -> dict[str, Any]:
    """Checked, normalised fault changes; ValueError names the first bad key or value."""
    limits = {
        "latency": MAX_DELAY_SECONDS,
        "jitter": MAX_DELAY_SECONDS,
        "throttle_fraction": 1.0,
        "error_fraction": 1.0,
    }
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}")
            checked[key] = value
        elif key == "refuse_code":
            if not isinstance(value, str) or not _ERROR_CODE.match(value):
                raise ValueError("refuse_code must be an STS error code (letters) or empty")
            checked[key] = value
        elif key in limits:
            checked[key] = _number(key, value, limits[key])
        else:
            known = ", ".join(("mode", "refuse_code", *limits))
            raise ValueError(f"unknown fault {key!r}; known: {known}")
    return checked


def sts_error(status: int, error_type: str, code: str, message: str) -> web.Response:
    body = STS_ERROR_XML.format(
        type=error_type, code=code, message=message, request_id=uuid.uuid4()
    )
    return web.Response(status=status, text=body, content_type="text/xml")
