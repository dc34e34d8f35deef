"""The package's layout: no module imports another that imports it back, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanogemma"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of its code)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for dep in graph[node]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep], done)
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start], done)
    assert "nanogemma.model" in graph and graph["nanogemma.cli"]  # the walk saw the package
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
