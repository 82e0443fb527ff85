"""A role ARN, `via` hub and ExternalId belong to one tenant unless both files say it is shared,
and the tenant is part of every cache key.

Two tenants' files once named the same role, and the second tenant was served the first's
cached credentials; `policy check` and every load now refuse the second file's naming."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from metaproxy.cli import main
from metaproxy.models import AssumeRoleSpec, Identity
from metaproxy.policy.load import END_LINE, check_policy_dir, load_policy_dir
from metaproxy.policy.sts_params import build_spec

SHARED = "arn:aws:iam::333333333333:role/reporting"
HUB = "arn:aws:iam::999999999999:role/metaproxy-hub"


def policy(tenant: str, roles: str, extra: str = "", session: str = "") -> str:
    """A complete policy file for `tenant` with these `[[roles]]` tables."""
    return (
        f'tenant = "{tenant}"\nteam = "t-{tenant}"\n\n'
        f'[[identities]]\nkind = "platform"\ntenant = "{tenant}"\n\n'
        f"{roles}\n{session}\n{extra}\n{END_LINE}\n"
    )


def role(arn: str, *, default: bool = True, via: str = "", external_id: str = "") -> str:
    lines = ["[[roles]]", f'arn = "{arn}"', 'apps = ["*"]']
    if default:
        lines.append("default = true")
    if via:
        lines.append(f'via = "{via}"')
    if external_id:
        lines.append(f'external_id = "{external_id}"')
    return "\n".join(lines) + "\n"


def shared(arn: str, *tenants: str) -> str:
    names = ", ".join(f'"{name}"' for name in tenants)
    return f'[shared_roles]\n"{arn}" = [{names}]\n'


def write(directory: Path, **files: str) -> Path:
    directory.mkdir(exist_ok=True)
    for tenant, text in files.items():
        (directory / f"{tenant.replace('_', '.')}.toml").write_text(text)
    return directory


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def problems_of(directory: Path) -> list[tuple[str, int, str, str]]:
    return [(Path(p.file).name, p.line, p.field, p.message) for p in check_policy_dir(directory)]


def test_the_second_tenant_naming_the_first_tenants_role_is_refused_by_policy_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """globex naming acme's role: `policy check` exits 1 with globex's file, line and field,
    naming acme's file and role."""
    directory = write(
        tmp_path / "policies",
        acme=policy("acme", role("arn:aws:iam::111111111111:role/acme-app")),
        globex=policy("globex", role("arn:aws:iam::111111111111:role/acme-app")),
    )
    assert main(["policy", "check", str(directory)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    globex = directory / "globex.toml"
    where = f"{globex}:{line_of(globex, 'arn = ')}: roles[0].arn: "
    assert line.startswith(where), line
    assert "belongs to tenant acme" in line
    assert f"({directory / 'acme.toml'} roles[0].arn)" in line
    assert "does not share it with globex" in line


@pytest.mark.parametrize(
    "written",
    [
        "arn:aws:iam::111111111111:role/Acme-App",
        "arn:aws:iam::111111111111:role/teams/payments/acme-app",
    ],
    ids=["case", "path"],
)
def test_the_same_role_written_another_way_is_still_the_same_role(
    tmp_path: Path, written: str
) -> None:
    """IAM tells roles apart by account and name, whatever the path or case: so does the rule."""
    directory = write(
        tmp_path / "p",
        acme=policy("acme", role("arn:aws:iam::111111111111:role/acme-app")),
        globex=policy("globex", role(written)),
    )
    assert [(file, field) for file, _, field, _ in problems_of(directory)] == [
        ("globex.toml", "roles[0].arn")
    ]


def test_another_tenants_role_or_hub_reached_through_via_is_refused(tmp_path: Path) -> None:
    """A hub is a role like any other: one tenant's hub is not another's to chain through, nor
    another tenant's role to be used as a hub."""
    chained = role(SHARED, via=HUB, external_id="${tenant}")
    directory = write(
        tmp_path / "p",
        acme=policy("acme", chained),
        globex=policy("globex", role(HUB)),
        initech=policy("initech", role("arn:aws:iam::444444444444:role/i", via=HUB)),
    )
    found = [
        (file, field, message.split("belongs to tenant ")[1].split()[0])
        for file, _, field, message in problems_of(directory)
    ]
    assert found == [
        ("globex.toml", "roles[0].arn", "acme"),
        ("initech.toml", "roles[0].via", "acme"),  # one problem per tenant it clashes with
        ("initech.toml", "roles[0].via", "globex"),
    ]


def test_a_role_both_files_share_loads_for_both(tmp_path: Path) -> None:
    """Each file lists the other (or "*") under [shared_roles]: both tenants get the role."""
    directory = write(
        tmp_path / "p",
        acme=policy("acme", role(SHARED), shared(SHARED, "globex")),
        globex=policy("globex", role(SHARED), shared(SHARED, "*")),
    )
    loaded = load_policy_dir(directory)
    assert {name: t.default_role.arn for name, t in loaded.tenants.items()} == {
        "acme": SHARED,
        "globex": SHARED,
    }


def test_a_hub_shared_by_every_file_that_chains_through_it_loads(tmp_path: Path) -> None:
    """A platform hub used by several tenants: each file shares it, each keeps its own role."""
    directory = write(
        tmp_path / "p",
        **{
            name: policy(
                name,
                role(
                    f"arn:aws:iam::{n}{n}{n}{n}44444444:role/{name}",
                    via=HUB,
                    external_id="${tenant}",
                ),
                shared(HUB, "*"),
            )
            for n, name in enumerate(["acme", "globex", "initech"], start=1)
        },
    )
    assert problems_of(directory) == []


@pytest.mark.parametrize(
    ("acme_shares", "globex_shares", "missing"),
    [
        (True, False, "this file does not share it with acme"),
        (False, True, "acme.toml does not share it with globex"),
        (False, False, "does not share it with globex and this file does not share it"),
    ],
)
def test_a_role_shared_by_one_side_only_is_refused(
    tmp_path: Path, acme_shares: bool, globex_shares: bool, missing: str
) -> None:
    """Sharing takes both files: neither can take the other's role on its own say-so."""
    directory = write(
        tmp_path / "p",
        acme=policy("acme", role(SHARED), shared(SHARED, "globex") if acme_shares else ""),
        globex=policy("globex", role(SHARED), shared(SHARED, "acme") if globex_shares else ""),
    )
    [(file, line, field, message)] = problems_of(directory)
    assert (file, line, field) == (
        "globex.toml",
        line_of(directory / "globex.toml", "arn = "),
        "roles[0].arn",
    )
    assert missing in message


def test_sharing_with_a_third_tenant_does_not_share_with_the_second(tmp_path: Path) -> None:
    """acme shares its role with initech only: globex naming it is refused."""
    directory = write(
        tmp_path / "p",
        acme=policy("acme", role(SHARED), shared(SHARED, "initech")),
        globex=policy("globex", role(SHARED), shared(SHARED, "acme")),
    )
    [(file, _, field, message)] = problems_of(directory)
    assert (file, field) == ("globex.toml", "roles[0].arn")
    assert "acme.toml does not share it with globex" in message


@pytest.mark.parametrize(
    ("table", "field", "complaint"),
    [
        (f'"{HUB}" = ["globex"]', f'shared_roles."{HUB}"', "no role of this file names it"),
        (f'"{SHARED}" = ["acme"]', f'shared_roles."{SHARED}"[0]', "own tenant"),
        (f'"{SHARED}" = ["no tenant"]', f'shared_roles."{SHARED}"[0]', "not a tenant name"),
        (f'"{SHARED}" = []', f'shared_roles."{SHARED}"', "at least one tenant"),
        (f'"{SHARED}" = "globex"', f'shared_roles."{SHARED}"', "array of tenant names"),
        ('"reporting" = ["globex"]', "shared_roles.reporting", "not an IAM role ARN"),
    ],
)
def test_each_shared_roles_entry_is_checked_at_its_line(
    tmp_path: Path, table: str, field: str, complaint: str
) -> None:
    """An entry for a role the file never names, the file's own tenant, a bad name or shape."""
    directory = write(
        tmp_path / "p", acme=policy("acme", role(SHARED), f"[shared_roles]\n{table}\n")
    )
    [(_, line, found, message)] = problems_of(directory)
    assert (line, found) == (line_of(directory / "acme.toml", table), field)
    assert complaint in message


def test_an_external_id_without_the_tenant_is_refused(tmp_path: Path) -> None:
    """A fixed ExternalId is anyone's to present: it must contain ${tenant}."""
    fixed = role(SHARED, via=HUB, external_id="partner-sync")
    directory = write(tmp_path / "p", acme=policy("acme", fixed))
    [(_, line, field, message)] = problems_of(directory)
    assert (line, field) == (
        line_of(directory / "acme.toml", "external_id"),
        "roles[0].external_id",
    )
    assert "must contain ${tenant}" in message
    ok = write(
        tmp_path / "ok", acme=policy("acme", role(SHARED, via=HUB, external_id="p-${tenant}"))
    )
    assert problems_of(ok) == []


def test_a_tenant_that_shares_roles_names_itself_in_its_session_names(tmp_path: Path) -> None:
    """Sessions of a shared role must tell the tenants apart: ${tenant} in session.name."""
    directory = write(
        tmp_path / "p",
        acme=policy(
            "acme", role(SHARED), shared(SHARED, "globex"), '[session]\nname = "s.${task}"\n'
        ),
    )
    [(_, line, field, message)] = problems_of(directory)
    assert (line, field) == (line_of(directory / "acme.toml", "name = "), "session.name")
    assert "must contain ${tenant}" in message


def test_the_tenant_is_part_of_every_cache_key(tmp_path: Path) -> None:
    """Specs alike but for their tenant are two cache entries; both hops of a chain carry it."""
    alike = AssumeRoleSpec(SHARED, "acme.eu.t1", "acme.eu.t1", 3600, tenant="acme")
    assert alike.cache_key != dataclasses.replace(alike, tenant="acme.eu").cache_key
    directory = write(
        tmp_path / "p",
        acme=policy("acme", role(SHARED, via=HUB, external_id="${tenant}"), shared(HUB, "*")),
    )
    tenant = load_policy_dir(directory).tenants["acme"]
    identity = Identity("platform", "iss", "sub", "t1", tenant="acme", app="web")
    spec = build_spec(tenant, tenant.default_role, identity)
    assert spec.via is not None
    assert (spec.tenant, spec.via.tenant) == ("acme", "acme")
    other = dataclasses.replace(spec, tenant="x", via=dataclasses.replace(spec.via, tenant="x"))
    assert spec.cache_key != other.cache_key


def test_the_shipped_policies_share_nothing() -> None:
    """policies/ names each role in one tenant's file only."""
    shipped = Path(__file__).resolve().parent.parent / "policies"
    arns = re.findall(
        r'^(?:arn|via) = "([^"]+)"',
        "".join(file.read_text() for file in shipped.rglob("*.toml")),
        re.M,
    )
    assert len(arns) == len(set(arns))
