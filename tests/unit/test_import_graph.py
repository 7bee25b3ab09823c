"""The library's import graph has no cycle, counting imports hidden inside functions.

A function-level import that closes a cycle still couples the two modules: the cycle is only
deferred to call time. So this test reads every module's source (AST), collects *all* imports of
securefml modules (module level and inside functions; only ``if TYPE_CHECKING:`` blocks are left
out, since they never run), and fails on a cycle between modules or between subpackages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it installs as (pyproject's package-dir mapping).
SOURCES = {
    "securefml": "securefml",
    "protocols": "securefml.protocols",
    "defenses": "securefml.defenses",
    "attacks": "securefml.attacks",
}


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("securefml.protocols") and folder == "securefml":
                continue  # never happens (folders are disjoint); guards a stray copy
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, current: str, is_package: bool, known: set[str]) -> Iterator[str]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = current.split(".") if is_package else current.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in known else base
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the securefml modules it imports (edges to ancestors' ``__init__`` left out)."""
    files = _module_files()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for target in _imports(tree, name, is_package, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            # Importing a module runs its ancestors' __init__ first: that is not a dependency of ours.
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of nodes (first == last), or ``None``."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    parent: dict[str, str] = {}

    for start in sorted(graph):
        if colour[start] != white:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = grey
        while stack:
            node, children = stack[-1]
            for child in children:
                if child not in colour:
                    continue
                if colour[child] == grey:
                    cycle, cur = [child, node], node
                    while cur != child:
                        cur = parent[cur]
                        cycle.append(cur)
                    return cycle[::-1]
                if colour[child] == white:
                    parent[child] = node
                    colour[child] = grey
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                colour[node] = black
                stack.pop()
    return None


def _subpackage(module: str) -> str:
    """``securefml.protocols.secagg`` -> ``securefml.protocols``; top-level modules stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_graph_sees_the_library() -> None:
    graph = import_graph()
    assert "securefml.protocols.secagg" in graph
    assert "securefml.defenses.base" in graph
    assert "securefml.errors" in graph["securefml.defenses.base"] or any(
        "securefml.errors" in graph[m] for m in graph if m.startswith("securefml.defenses")
    )


def test_no_module_level_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_subpackage_cycle() -> None:
    modules = import_graph()
    grouped: dict[str, set[str]] = {}
    for module, targets in modules.items():
        group = _subpackage(module)
        grouped.setdefault(group, set()).update(_subpackage(t) for t in targets if _subpackage(t) != group)
    cycle = find_cycle(grouped)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, False),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], has_cycle: bool) -> None:
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle
    if cycle:
        assert cycle[0] == cycle[-1]
        assert all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
