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


# imported only where an extra is installed (each import is inside the code path of that option): the extra and
# the requirement in it that brings the module (vLLM comes with ray[llm], which pins it)
OPTIONAL_IMPORTS = {"vllm": ("gpu", "ray[llm]"), "datasets": ("hf", "datasets"), "mlflow": ("dev", "mlflow"),
                    "wandb": ("dev", "wandb")}


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in the shipped code (qcrd_ray/, serve/, jobs/) that are neither the
    standard library nor ours."""
    import sys

    root = PACKAGE.parent
    names = set()
    for path in [*root.joinpath("qcrd_ray").rglob("*.py"), *root.joinpath("serve").rglob("*.py"),
                 *root.joinpath("jobs").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"qcrd_ray", "serve", "jobs"}}


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, transitively, with the extras they ask for (normalized names)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(Requirement(r), None) for r in requirements]
    while todo:
        req, parent_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra or ""}):
            continue
        name = canonicalize_name(req.name)
        for extra in [None, *sorted(req.extras)]:
            key = f"{name}[{extra}]" if extra else name
            if key in seen:
                continue
            seen.add(key)
            todo += [(Requirement(r), extra) for r in (md.requires(name) or [])]
    return {k.split("[")[0] for k in seen}


def test_every_third_party_import_comes_with_the_declared_dependencies():
    """`pip install -e .` (the README's first command) must bring every module the code imports: a module that
    arrives only through a dev extra breaks a user's install where the suite cannot see it (scipy came with mlflow
    alone, and `qcrd sweep` failed after training every trial)."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    installed = _closure(project["dependencies"])
    providers = md.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports() - set(OPTIONAL_IMPORTS)):
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported but not brought by pyproject's dependencies: {missing}"
    extras = project["optional-dependencies"]
    for module, (extra, requirement) in OPTIONAL_IMPORTS.items():
        wanted = Requirement(requirement)
        assert any((r.name, r.extras) == (wanted.name, wanted.extras) for r in map(Requirement, extras[extra])), \
            (module, extra)


def test_a_suite_that_would_test_another_copy_of_the_package_names_it():
    """A PYTHONPATH left pointing at another checkout (a pinned worktree, say) made the suite import that copy's
    qcrd_ray beside this one's tests and serve/: 34 confusing failures instead of one line. conftest refuses it."""
    from tests.conftest import foreign_package_message

    root = PACKAGE.parent
    assert foreign_package_message(str(PACKAGE / "__init__.py"), root) is None
    message = foreign_package_message("/work/study/qcrd_ray/__init__.py", root)
    assert message.startswith(f"qcrd_ray is imported from /work/study/qcrd_ray, not from this checkout ({root})")
