"""PolicyStore: a bad edit is refused and logged, the last good set stays in force."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from metaproxy.policy.load import END_LINE, PolicyError
from metaproxy.policy.store import PolicyStore

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
GOOD_ROLE = 'arn = "arn:aws:iam::222222222222:role/globex-app"'
OTHER_ROLE = 'arn = "arn:aws:iam::222222222222:role/globex-service"'
BAD_ROLE = 'arn = "arn:aws:iam::2222:role/globex-app"'


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def globex_role(store: PolicyStore) -> str:
    return store.current.tenants["globex"].default_role.arn


def test_invalid_edit_is_refused_and_logged(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken edit returns its problems, logs them with file:line: field, keeps the old set."""
    store = PolicyStore(directory)
    before = store.current
    globex = directory / "globex.toml"
    replace_in(globex, GOOD_ROLE, BAD_ROLE)
    bad_line = globex.read_text().splitlines().index(BAD_ROLE) + 1

    with caplog.at_level(logging.ERROR, logger="metaproxy.policy"):
        problems = store.reload()

    assert [(p.line, p.field) for p in problems] == [(bad_line, "roles[0].arn")]
    assert store.current is before
    assert store.generation == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "metaproxy.policy"]
    assert any(f"globex.toml:{bad_line}: roles[0].arn:" in line for line in logged), logged
    assert all(r.levelno == logging.ERROR for r in caplog.records if r.name == "metaproxy.policy")


def test_fixed_file_is_picked_up_and_generation_counts_successes(directory: Path) -> None:
    """After a refused edit, the corrected file takes effect and only successes bump generation."""
    store = PolicyStore(directory)
    globex = directory / "globex.toml"
    replace_in(globex, GOOD_ROLE, BAD_ROLE)
    assert store.reload()
    assert store.generation == 0

    replace_in(globex, BAD_ROLE, OTHER_ROLE)
    assert store.reload() == []
    assert store.generation == 1
    assert globex_role(store) == "arn:aws:iam::222222222222:role/globex-service"


def test_changed_tracks_edits_additions_and_removals(directory: Path) -> None:
    """`changed()` notices edited, added and removed *.toml files, and nothing else."""
    store = PolicyStore(directory)
    assert not store.changed()
    (directory / "notes.txt").write_text("not a policy")
    assert not store.changed()
    replace_in(directory / "globex.toml", GOOD_ROLE, OTHER_ROLE)
    assert store.changed()
    store.reload()
    assert not store.changed()
    (directory / "globex.toml").unlink()
    assert store.changed()
    assert store.reload() == []
    assert sorted(store.current.tenants) == ["acme"]


def test_invalid_directory_refuses_to_start(directory: Path) -> None:
    """A store cannot be built on an invalid set: the broker must not start without policy."""
    replace_in(directory / "acme.toml", 'team = "payments"', "team = null")
    with pytest.raises(PolicyError) as caught:
        PolicyStore(directory)
    assert [p.field for p in caught.value.problems] == ["team"]


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_watch_reloads_good_edits_and_keeps_last_good_set(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher applies a valid edit, refuses a broken one, then applies its fix."""
    store = PolicyStore(directory)
    globex = directory / "globex.toml"
    watcher = asyncio.create_task(store.watch(0.02))
    try:
        replace_in(globex, GOOD_ROLE, OTHER_ROLE)
        await wait_for(lambda: store.generation == 1)
        assert globex_role(store).endswith("/globex-service")

        with caplog.at_level(logging.ERROR, logger="metaproxy.policy"):
            replace_in(globex, OTHER_ROLE, BAD_ROLE)
            await wait_for(lambda: "roles[0].arn" in caplog.text)
        assert store.generation == 1
        assert globex_role(store).endswith("/globex-service")

        replace_in(globex, BAD_ROLE, GOOD_ROLE + "  # fixed")
        await wait_for(lambda: store.generation == 2)
        assert globex_role(store).endswith("/globex-app")
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


REPORTS_ROLE = """
[[roles]]
arn = "arn:aws:iam::222222222222:role/globex-reports"
duration_seconds = 3600
apps = ["reports"]
"""


def roles_of(store: PolicyStore) -> dict[str, tuple[str, ...]]:
    return {role.name: role.apps for role in store.current.tenants["globex"].roles}


def before_the_end(text: str, addition: str) -> str:
    """`text` with `addition` just before its `# end of policy` line, which stays last."""
    body = text.removesuffix(END_LINE + "\n")
    assert body != text
    return body + addition + "\n" + END_LINE + "\n"


async def test_half_written_role_never_loads_then_the_whole_file_does(directory: Path) -> None:
    """A role table caught before its `apps` line is refused (no default opens it to every app)
    and the old set stays in force; once the file is complete it loads."""
    store = PolicyStore(directory)
    globex = directory / "globex.toml"
    whole = before_the_end(globex.read_text(), REPORTS_ROLE)
    half = whole[: whole.index('apps = ["reports"]')]
    watcher = asyncio.create_task(store.watch(0.05))
    try:
        globex.write_text(half)
        await asyncio.sleep(0.5)  # many polls: stable, parsed, and refused
        assert (store.generation, roles_of(store)) == (0, {"globex-app": ("*",)})

        globex.write_text(whole)
        await wait_for(lambda: store.generation == 1)
        assert roles_of(store) == {"globex-app": ("*",), "globex-reports": ("reports",)}
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


async def test_a_file_still_changing_is_not_loaded_until_it_is_stable(directory: Path) -> None:
    """A writer that rewrites the file every 40 ms, each version complete and valid: the
    watcher loads none of them while the file keeps changing (two reads a poll apart differ),
    then the version that stays."""
    store = PolicyStore(directory)
    globex = directory / "globex.toml"
    start = globex.read_text()
    seen: list[dict[str, tuple[str, ...]]] = []

    async def observe() -> None:
        while True:
            seen.append(roles_of(store))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(store.watch(0.1))
    observer = asyncio.create_task(observe())
    try:
        for version in range(30):  # 1.2 s of versions, each with one more comment line
            globex.write_text(before_the_end(start, REPORTS_ROLE + "# still writing\n" * version))
            await asyncio.sleep(0.04)
        globex.write_text(before_the_end(start, REPORTS_ROLE + "[limits.sidecar]\nburst = 7\n"))
        await wait_for(lambda: store.generation == 1)
    finally:
        for task in (watcher, observer):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert store.generation == 1
    assert store.current.tenants["globex"].sidecar_limits.burst == 7
    assert {tuple(roles) for roles in seen} <= {("globex-app",), ("globex-app", "globex-reports")}
    assert seen.count({"globex-app": ("*",)}) >= 50  # the old set, all through the writes


async def test_a_cut_file_left_on_disk_is_never_loaded(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """acme's file cut before its role's `session_policy` (valid TOML, stable on disk, as a `cp`
    on a full disk leaves it): refused at every poll, naming where it stops; the set in force
    keeps acme-app's session policy and tags."""
    store = PolicyStore(directory)
    acme = directory / "acme.toml"
    text = acme.read_text()
    cut = text[: text.index("session_policy = '''", text.index("\ntenant ="))]
    watcher = asyncio.create_task(store.watch(0.05))
    try:
        with caplog.at_level(logging.ERROR, logger="metaproxy.policy"):
            acme.write_text(cut)
            await asyncio.sleep(0.6)  # many polls of a file that no longer changes
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    assert store.generation == 0
    kept = store.current.tenants["acme"]
    assert kept.default_role.session_policy is not None
    assert dict(kept.session.tags)["tenant"] == "${tenant}"
    line = cut.count("\n")
    refusals = [r.getMessage() for r in caplog.records if "policy problem" in r.getMessage()]
    assert any(
        f"acme.toml:{line}: roles[0].duration_seconds: incomplete file" in r for r in refusals
    ), refusals
