"""The package reads from the bottom up: no import climbs a layer, no modules import each other.

Measured from the code itself: every `import` and `from … import` of a `metaproxy` module in
`metaproxy/`, at any depth (inside functions and under `TYPE_CHECKING` too), parsed with `ast`.
A layer may use any layer below it and its own; a cycle is forbidden at any size, across files
or packages.

    5  cli, __main__, commands.configdoc     the command dispatcher, and the page made from it
    4  commands, demo, testing               tools that stand on their own
    3  sidecar, broker, webhook              the three processes
    2  identity, policy, audit, podnet       what the processes are made of
    1  net, process                          connections, HTTP framing, process plumbing
    0  errors, models, config, clock, …      values and rules everything shares
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metaproxy"

LAYERS: dict[str, int] = {  # the first prefix that matches decides
    "metaproxy.cli": 5,
    "metaproxy.__main__": 5,
    "metaproxy.commands.configdoc": 5,  # the configuration page, from the whole command tree
    "metaproxy.commands": 4,
    "metaproxy.demo": 4,
    "metaproxy.testing": 4,
    "metaproxy.sidecar": 3,
    "metaproxy.broker": 3,
    "metaproxy.webhook": 3,
    "metaproxy.identity": 2,
    "metaproxy.policy": 2,
    "metaproxy.audit": 2,
    "metaproxy.podnet": 2,
    "metaproxy.net": 1,
    "metaproxy.process": 1,
}
# Each process's wing keeps to itself: the sidecar holds no AWS rights and is a per-pod cost.
FORBIDDEN = {
    "metaproxy.sidecar": (
        "metaproxy.broker",
        "metaproxy.webhook",
        "metaproxy.policy",
        "metaproxy.audit",
        "metaproxy.identity",
    ),
    "metaproxy.webhook": ("metaproxy.broker",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The metaproxy modules `name` imports, resolved to modules (not names within them)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("metaproxy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("metaproxy"):
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in MODULES else target)
    return {module for module in found if module in MODULES and module != name}


@functools.cache
def graph() -> dict[str, set[str]]:
    """Every module's metaproxy imports. Built when a test asks, not at import: every xdist
    worker imports this module to collect it, and parsing the whole package took 0.7 s each."""
    return {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    for prefix, level in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    return 0


def test_no_import_climbs_a_layer() -> None:
    """Every import goes to the same layer or one below it."""
    climbing = [
        f"{a} ({layer(a)}) -> {b} ({layer(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert climbing == []


@pytest.mark.parametrize("wing", sorted(FORBIDDEN))
def test_a_wing_keeps_out_of_the_others(wing: str) -> None:
    """The sidecar imports nothing of the broker, policy, audit or identity; the webhook
    nothing of the broker."""
    bad = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        if a == wing or a.startswith(wing + ".")
        for b in targets
        if any(b == f or b.startswith(f + ".") for f in FORBIDDEN[wing])
    ]
    assert bad == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other() -> None:
    """No cycle of imports between modules, however long."""
    assert strongly_connected(graph()) == []


def test_the_layer_map_names_every_package() -> None:
    """A new package gets a layer on purpose: everything not listed is the bottom layer's, and
    only single modules belong there."""
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    unplaced = sorted(p for p in packages if p != "metaproxy" and layer(p) == 0)
    assert unplaced == []
