"""The graph of imports between ``neu_model`` modules, read from the source with ``ast``.

Imports inside functions count as much as those at the top of a file: they run as soon as the
function does, and they make the importing stage depend on the imported file. Imports under
``if TYPE_CHECKING:`` do not count: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from neu_model.core.paths import ROOT

PACKAGE = "neu_model"
PACKAGE_DIR = ROOT / PACKAGE


def modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package: dotted name to file."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in ``tree`` (functions and classes too), except type-checking blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules among ``known`` that module ``name`` (file ``path``) imports."""
    package = name.rpartition(".")[0] if path.name != "__init__.py" else name
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name` imports pkg, and pkg.name when that is a module
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c
            parts = target.split(".")
            out |= {m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in known}
    out.discard(name)
    return out


def graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module name to the names of the package's modules it imports."""
    found = modules(package_dir)
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    """``start`` and every module it imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle per group of modules that import each other, as a path ``a -> b -> ... -> a``;
    empty when there is none."""
    reach = {name: set().union(*(closure(child, edges) for child in edges[name])) for name in edges}
    on_cycle = sorted(name for name in edges if name in reach[name])
    found, seen = [], set()
    for name in on_cycle:
        if name not in seen:
            group = {other for other in on_cycle if other in reach[name] and name in reach[other]}
            seen |= group
            found.append(_path_back(name, group, edges))
    return found


def _path_back(start: str, group: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest import path from ``start`` back to itself through ``group``."""
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, set()) & group):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    return [start]
