"""Typed reads of one parsed policy file that collect problems instead of stopping at the first.

A policy file is operator input like any other: an API once crashed, failed over and crashed
again on a `null` nobody validated. So nothing is assumed: each read checks the value's type
and reports a problem at the field's line when it is wrong, then carries on with a harmless
stand-in so the rest of the file is still checked.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from metaproxy.policy import sts_params
from metaproxy.policy.locate import FieldLocator, FieldPath, format_path
from metaproxy.policy.problems import PolicyProblem


def type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def variables_help() -> str:
    return ", ".join(f"${{{name}}}" for name in sts_params.VARIABLES)


class FileChecker:
    """Validates one parsed file; collects problems instead of stopping at the first."""

    def __init__(self, display: str, text: str, kubernetes_issuers: Collection[str] = ()) -> None:
        self.display = display
        self.locator = FieldLocator(text)
        self.problems: list[PolicyProblem] = []
        self.kubernetes_issuers = kubernetes_issuers

    def problem(self, path: FieldPath, message: str) -> None:
        line = self.locator.line_of(path)
        self.problems.append(PolicyProblem(self.display, line, format_path(path), message))

    def table(
        self, value: object, path: FieldPath, allowed: set[str] | None = None
    ) -> dict[str, Any]:
        """`value` as a table, reporting keys outside `allowed` (None: any key)."""
        if not isinstance(value, dict):
            self.problem(path, f"must be a table, not {type_name(value)}")
            return {}
        if allowed is not None:
            expected = ", ".join(sorted(allowed))
            for key in sorted(set(value) - allowed):
                self.problem((*path, key), f"unknown key; expected one of {expected}")
        return value

    def string(self, table: dict[str, Any], path: FieldPath, default: str | None = None) -> str:
        key = str(path[-1])
        if key not in table:
            if default is None:
                self.problem(path, "missing; this field is required")
            return default or ""
        value = table[key]
        if not isinstance(value, str):
            self.problem(path, f"must be a string, not {type_name(value)}")
            return default or ""
        return value

    def globs(self, table: dict[str, Any], path: FieldPath, required: str = "") -> tuple[str, ...]:
        """The glob array at `path`; absent, `["*"]`, unless `required` says why it must be
        written out (then a problem, and no globs: the rule matches nothing)."""
        if required and str(path[-1]) not in table:
            self.problem(path, f"missing; {required}")
            return ()
        value = table.get(str(path[-1]), ["*"])
        if not isinstance(value, list) or not value:
            self.problem(path, "must be a non-empty array of glob strings")
            return ()
        for index, glob in enumerate(value):
            if not isinstance(glob, str) or not glob:
                self.problem((*path, index), f"must be a non-empty string, not {glob!r}")
        return tuple(glob for glob in value if isinstance(glob, str))

    def template(self, template: str, path: FieldPath) -> bool:
        """True if `template` names only known variables and every `${` is closed."""
        ok = True
        for name in sts_params.template_variables(template):
            if name not in sts_params.VARIABLES:
                self.problem(path, f"unknown variable ${{{name}}}; use {variables_help()}")
                ok = False
        if "${" in sts_params.literal_text(template):
            self.problem(path, "unterminated ${ in template")
            ok = False
        return ok

    def name_template(self, template: str, path: FieldPath, what: str) -> None:
        """Refuse RoleSessionName/SourceIdentity templates that can never give a usable name."""
        if not self.template(template, path):
            return
        literal = sts_params.literal_text(template)
        if not template.strip():
            self.problem(path, f"empty template can never produce a valid {what}")
        bad = sorted({ch for ch in literal if ch not in sts_params.NAME_CHARS})
        if bad:
            self.problem(
                path,
                f"{what} can never contain {''.join(bad)!r}; STS accepts only A-Z a-z 0-9 _+=,.@-",
            )
        if len(literal) > sts_params.NAME_MAX - 2:
            self.problem(path, f"fixed text leaves no room in a {sts_params.NAME_MAX}-char {what}")
