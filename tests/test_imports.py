"""sparsemoe's own imports form no cycle: each module may import only modules below it.

The graph is read from the source (ast), every import statement counted, also those inside
functions: a lazy import back up is still an arrow both ways. Importing ``a.b.c`` runs the
``__init__`` of every package on the way that is not already an ancestor of the importer.
The one exception is a module's own ``__getattr__``: it resolves deprecated aliases of names
that moved elsewhere (PEP 562) and runs only when such an old name is used.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparsemoe

ROOT = Path(sparsemoe.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: the sparsemoe modules its import statements run}`` for the package at
    ``root``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        tree.body = [s for s in tree.body
                     if not (isinstance(s, ast.FunctionDef) and s.name == "__getattr__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets.add(origin)
                # `from package import module` runs that module
                targets.update(f"{origin}.{a.name}" for a in node.names
                               if f"{origin}.{a.name}" in files)
        edges = set()
        for target in targets:
            if target.split(".")[0] != root.name:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                ancestor = name == step or name.startswith(step + ".")
                if step in files and not ancestor:
                    edges.add(step)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_sparsemoe_imports_have_no_cycle():
    graph = import_graph(ROOT)
    assert "sparsemoe.layers" in graph["sparsemoe.dense_paths"]  # the walk sees the imports
    assert "sparsemoe.parallel" in graph["sparsemoe.layers"]  # the package on the way counts
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, cycle", [
    # a lazy import back from a lower module
    ({"pkg/__init__.py": "", "pkg/low.py": "def f():\n    from .high import g\n",
      "pkg/high.py": "from .low import f\n"},
     ["pkg.high", "pkg.low", "pkg.high"]),
    # a lazy import inside a method named __getattr__ is still an import
    ({"pkg/__init__.py": "", "pkg/low.py": "class A:\n    def __getattr__(self, n):\n"
      "        from .high import g\n", "pkg/high.py": "from .low import A\n"},
     ["pkg.high", "pkg.low", "pkg.high"]),
    # a package whose __init__ imports a module that imports a child of the package
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from .top import x\n",
      "pkg/sub/base.py": "", "pkg/sub/top.py": "from ..layer import y\n",
      "pkg/layer.py": "from .sub.base import z\n"},
     ["pkg.layer", "pkg.sub", "pkg.sub.top", "pkg.layer"]),
])
def test_find_cycle_catches_planted_cycles(tmp_path, files, cycle):
    assert find_cycle(import_graph(write(tmp_path, files))) == cycle


def test_find_cycle_accepts_children_importing_siblings_through_their_package(tmp_path):
    files = {"pkg/__init__.py": "from . import a, b\n", "pkg/a.py": "from . import b\n",
             "pkg/b.py": "import pkg.c\n", "pkg/c.py": "from pkg import d\n", "pkg/d.py": ""}
    graph = import_graph(write(tmp_path, files))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.c"] == {"pkg.d"}
    assert find_cycle(graph) is None
