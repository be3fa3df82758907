"""The package's import graph, read from the source (an AST walk, nothing imported): no two modules import each
other, and ``qcrd_ray/qcrd/`` is torch only (docs/design.md, "Layout and module contracts")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qcrd_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The names ``name`` imports (``from a import b`` names a.b and a), less those under ``if TYPE_CHECKING``."""
    names = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                names.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's package upwards
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                names.update([base, *(f"{base}.{a.name}" for a in child.names)])
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imported(name, path, top_level_only):
            while target and target not in modules:  # a name imported from a module → the module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (every import cycle lies in one)."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        reach[start] = seen
    components = {frozenset({m} | {o for o in reach[m] if m in reach[o]}) for m in graph}
    return [set(c) for c in components if len(c) > 1]


def test_no_import_cycle_when_modules_load():
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_import_cycle_through_function_level_imports_either():
    # a lazy import hides a cycle from the module loader, not from the reader: config imports the teacher registry
    # and the teacher modules once imported config back (for ConfigError, now in errors.py); sweep and
    # sweep_console imported each other
    assert _cycles(_graph(top_level_only=False)) == []


def test_the_method_package_is_torch_only():
    graph = {n: _imported(n, p, top_level_only=False) for n, p in _modules().items() if n.startswith("qcrd_ray.qcrd")}
    assert graph and not {n: i for n, i in graph.items() if any(m == "ray" or m.startswith("ray.") for m in i)}
