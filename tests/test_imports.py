"""The import graph runs downwards: `python -m pytest tests/test_imports.py`.

Packages are layered (docs/architecture.md); a module may import from its own layer or below, lazily or not (at most
one named arrow back up), and no two modules import each other, directly or round a circle.
"""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    ("scimoe.config", "scimoe.registry", "scimoe.errors", "scimoe.run_dir", "scimoe.hardware"),
    ("scimoe.model",),
    ("scimoe.parallel",),
    ("scimoe.checkpoint", "scimoe.data"),
    ("scimoe.train",),
    ("scimoe.rl",),
    ("scimoe.convert", "scimoe.plan", "scimoe.report"),
    ("scimoe.launch",),
]
ALLOWED_UPWARD: set[tuple[str, str]] = set()
"""(importer, imported) pairs allowed to point up; the issue that set this allowed one, none is needed today."""


def _layer(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py")


def import_graph() -> dict[str, set[str]]:
    """module → the scimoe modules it imports (at the top or inside a function)."""
    graph: dict[str, set[str]] = {}
    for root, _, files in os.walk(os.path.join(REPO, "scimoe")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scimoe"):
                    targets.add(node.module)  # and `from package import module` names the module too:
                    targets.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names if a.name.startswith("scimoe"))
            graph[module] = targets - {module}
    return graph


def test_imports_point_down_but_for_the_one_named_arrow():
    graph = import_graph()
    modules = set(graph)
    upward = {(m, t) for m, targets in graph.items() for t in targets if t in modules and _layer(t) > _layer(m)}
    assert upward <= ALLOWED_UPWARD, sorted(upward - ALLOWED_UPWARD)
    assert len(upward) <= 1


def test_no_module_imports_round_a_circle():
    graph = import_graph()
    modules = set(graph)

    def resolve(target: str) -> str | None:  # `from scimoe.checkpoint import storage` names a package
        return target if target in modules else None

    edges = {m: {t for t in map(resolve, targets) if t} for m, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError(" → ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
