"""What is wrong with a policy directory: each problem at its file, line and field.

Every problem is reported at once, as `file:line: field: message` (what editors jump to), so
an operator fixes a directory in one pass instead of one error per reload.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaproxy.errors import ConfigError


@dataclass(frozen=True)
class PolicyProblem:
    file: str
    line: int  # 1-based; 0 when unknown
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class PolicyError(ConfigError):
    """A policy directory that must not be used; `problems` lists everything wrong with it."""

    public_message = "invalid policy"

    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems
