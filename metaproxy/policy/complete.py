"""A policy file is loaded only when it is complete by construction: it ends with `# end of policy`.

A file cut short is often still valid TOML. A `cp` that hit a full disk left acme's file cut
just before its role's `session_policy`: it parsed, stayed on disk past the store's two reads,
and acme-app was issued with no session policy and no session tags. Reading twice only catches
a writer still at work; a writer that stopped half way must be recognisable from the bytes.

So the file's last line is `# end of policy`, followed by a newline, and that line appears
nowhere else. No strict prefix of a valid file passes: a prefix ending in that line and its
newline would hold the line earlier in the file, which the rule refuses. The line is a TOML
comment, so it changes nothing else, and it survives every way policies reach the broker: a
ConfigMap volume, git-sync, `cp` by hand, configuration management. (A checksum line would do
as well but needs a tool after every hand edit; "written by rename only" cannot be checked from
the file at all.)
"""

from __future__ import annotations

from metaproxy.policy.locate import FieldLocator, format_path
from metaproxy.policy.problems import PolicyProblem

END_LINE = "# end of policy"
_END = END_LINE.encode()


def _is_end(line: bytes) -> bool:
    # Trailing spaces and a CR (a file saved with CRLF endings) are still the end line.
    return line.rstrip(b" \t\r") == _END


def completeness_problems(display: str, data: bytes) -> list[PolicyProblem]:
    """Why `data` is not a complete policy file ([] when it is)."""
    # Every element but the last was followed by a newline; the last is what trails the final
    # newline (b"" in a file that ends with one).
    lines = data.split(b"\n")
    last = len(lines) - 1 if not lines[-1] else len(lines)  # 1-based number of the last line
    problems: list[PolicyProblem] = []
    for number, line in enumerate(lines[: last - 1], start=1):
        if _is_end(line):
            more = last - number
            follow = "1 more line follows" if more == 1 else f"{more} more lines follow"
            problems.append(
                PolicyProblem(
                    display,
                    number,
                    "",
                    f"`{END_LINE}` must be the last line, and {follow} it; remove it or what "
                    "follows (was something appended to the file?)",
                )
            )
    if lines[-1] or last == 0 or not _is_end(lines[last - 1]):
        if lines[-1] and _is_end(lines[-1]):
            why = f"`{END_LINE}` has no newline after it"
        else:
            why = f"the last line is not `{END_LINE}`"
        at = max(last, 1)
        field = FieldLocator(data.decode("utf-8", "replace")).field_at(at)
        problems.append(
            PolicyProblem(
                display,
                at,
                format_path(field),
                f"incomplete file: {why}. A policy file ends with that line and a newline, so a "
                "file cut short while being written is never loaded; the last good policy set "
                "stays in force",
            )
        )
    return problems
