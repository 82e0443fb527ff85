"""A policy file is loaded only when complete by construction: it ends with `# end of policy`.

A file cut short is often valid TOML (acme's, cut before its `session_policy`, once issued
acme-app unscoped and untagged); the end line makes every strict prefix of a valid file a
refused one, reported at the file, line and field where it stops."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaproxy.cli import main
from metaproxy.policy.load import (
    END_LINE,
    PolicyError,
    PolicySnapshot,
    check_policy_dir,
    load_policy_dir,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"


def shipped_files() -> list[Path]:
    return sorted(SHIPPED.rglob("*.toml"))


def documented_policies() -> dict[str, str]:
    """Every policy a reader may copy whole: the Kubernetes base's (its `metaproxy-policies`
    ConfigMap), and the docs' TOML blocks that are whole files (a `tenant` and a `[[roles]]`
    table; others are excerpts)."""
    found: dict[str, str] = {}
    for file in sorted((REPO / "deploy" / "kubernetes" / "base" / "policies").glob("*.toml")):
        found[f"deploy/kubernetes/base/policies/{file.name}"] = file.read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        blocks = re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)
        for number, block in enumerate(blocks):
            if "[[roles]]" in block and re.search(r"^tenant = ", block, re.M):
                found[f"{page.name}#{number}"] = block
    return found


def load_bytes(name: str, data: bytes) -> list[str]:
    """The problems of a directory holding one file with exactly these bytes (in memory)."""
    file = Path("/policies") / name
    snapshot = PolicySnapshot(file.parent, True, ((file, data),))
    try:
        load_policy_dir(file.parent, snapshot=snapshot)
    except PolicyError as exc:
        return [str(problem) for problem in exc.problems]
    return []


def test_every_shipped_and_documented_policy_is_complete(tmp_path: Path) -> None:
    """policies/, its examples, the deploy ConfigMap and the docs' examples all check clean."""
    for file in shipped_files():
        assert load_bytes(file.name, file.read_bytes()) == [], file
    documented = documented_policies()
    assert len(documented) >= 2, documented
    for where, text in documented.items():
        tenant = re.search(r'^tenant = "([^"]+)"', text, re.M)
        assert tenant, where
        assert load_bytes(f"{tenant.group(1)}.toml", text.encode()) == [], where


@pytest.mark.parametrize("file", shipped_files(), ids=lambda file: file.name)
@pytest.mark.slow  # started first: see tests/conftest.py
def test_no_prefix_of_a_shipped_policy_loads(file: Path) -> None:
    """Cut at every byte offset, each shipped file is refused as incomplete, never loaded."""
    data = file.read_bytes()
    loaded = [cut for cut in range(len(data)) if not load_bytes(file.name, data[:cut])]
    assert loaded == []
    incomplete = [
        cut
        for cut in range(len(data))
        if not any("incomplete file" in problem for problem in load_bytes(file.name, data[:cut]))
    ]
    assert incomplete == []


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from(shipped_files()),
    cut=st.floats(min_value=0, max_value=1, exclude_max=True),
    crlf=st.booleans(),
    trailing=st.sampled_from(["", " ", "\t "]),
)
def test_any_cut_of_any_valid_file_is_refused(
    which: Path, cut: float, crlf: bool, trailing: str
) -> None:
    """Whatever the line endings and spaces after the end line, a valid file loads whole and
    any strict prefix of it is refused as incomplete."""
    text = which.read_text().removesuffix(END_LINE + "\n") + END_LINE + trailing + "\n"
    data = (text.replace("\n", "\r\n") if crlf else text).encode()
    assert load_bytes(which.name, data) == []
    problems = load_bytes(which.name, data[: int(cut * len(data))])
    assert any("incomplete file" in problem for problem in problems), problems


def test_a_cut_file_is_reported_where_it_stops(tmp_path: Path) -> None:
    """The refusal names the file, the line where it stops and the field on it."""
    shutil.copytree(SHIPPED, tmp_path / "policies", ignore=shutil.ignore_patterns("examples"))
    acme = tmp_path / "policies" / "acme.toml"
    text = acme.read_text()
    acme.write_text(text[: text.index("session_policy = '''", text.index("\ntenant ="))])
    line = acme.read_text().count("\n")  # the cut is at a line's start: the last whole line
    [problem] = check_policy_dir(tmp_path / "policies")
    assert (problem.file, problem.line, problem.field) == (
        str(acme),
        line,
        "roles[0].duration_seconds",
    )
    assert problem.message.startswith(f"incomplete file: the last line is not `{END_LINE}`")


def test_text_after_the_end_line_is_refused(tmp_path: Path) -> None:
    """A role appended after the end line is refused at the end line, not silently loaded."""
    shutil.copytree(SHIPPED, tmp_path / "policies", ignore=shutil.ignore_patterns("examples"))
    globex = tmp_path / "policies" / "globex.toml"
    end = globex.read_text().count("\n")
    with globex.open("a") as appending:
        appending.write('\n[[roles]]\narn = "arn:aws:iam::222222222222:role/x"\napps = ["*"]\n')
    problems = check_policy_dir(tmp_path / "policies")
    assert [(p.line, p.field) for p in problems] == [(end, ""), (end + 4, "roles[1].apps")]
    assert "must be the last line, and 4 more lines follow it" in problems[0].message
    assert "incomplete file" in problems[1].message


def test_policy_check_refuses_a_cut_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`metaproxy policy check` exits 1 on a cut file and prints file:line: field: why."""
    shutil.copytree(SHIPPED, tmp_path / "policies", ignore=shutil.ignore_patterns("examples"))
    globex = tmp_path / "policies" / "globex.toml"
    text = globex.read_text()
    globex.write_text(text[: text.index("[limits.broker]")])
    assert main(["policy", "check", str(tmp_path / "policies")]) == 1
    out = capsys.readouterr().out
    line = globex.read_text().count("\n")
    assert out.startswith(f"{globex}:{line}: session: incomplete file: ")
