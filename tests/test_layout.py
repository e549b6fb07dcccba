"""The module layout the README promises: no import cycles, adapters that never import each other,
and no production module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import careservice

ROOT = Path(careservice.__file__).parent
PACKAGES = {"careservice": ROOT, "careservice.handlers": ROOT.parent / "handlers"}
ADAPTERS = {"careservice.intake.smtp", "careservice.intake.imap", "careservice.intake.web"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        if not folder.is_dir():  # an installed wheel: handlers/ lives inside careservice/
            continue
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found.setdefault(name, path)
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The careservice modules `path` imports at module level (what runs when it is imported)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges = {}
    for name, path in found.items():
        # a module's own package __init__ runs before it anyway: not an edge that can close a cycle
        edges[name] = {m for m in imports(path, known) if not name.startswith(m + ".")}
    return edges


def test_the_import_graph_has_no_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [name, other] if other in path else [name, other])
            elif other not in state:
                visit(other, [*path, name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    assert cycles == []
    assert len(edges) > 50  # the walk saw the package, not an empty folder


def test_adapters_never_import_each_other() -> None:
    edges = graph()
    for adapter in ADAPTERS:
        assert edges[adapter] & ADAPTERS == set(), adapter


def test_no_production_module_is_over_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
