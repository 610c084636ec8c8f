"""The layering, read from the code with ``ast``: engines stand alone (no ``export`` import but the session's
rebuild policy) and the ``engines`` modules import each other without a circle; what both sides share lives
in ``mvz.artifacts``, which imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the one engines module allowed to call the exporter: the session's "refit, else rebuild" policy
EXPORT_ALLOWED = {"engines.session"}
# functions whose imports are not counted (none: the rebuild lives in engines/session.py)
PENDING: dict[str, set[str]] = {}


def imported_modules(path: Path, package: str, skip_functions: set[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (lazy imports count too), except
    inside the top-level functions named in ``skip_functions``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in skip_functions)]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            out.add(stem)
            out.update(f"{stem}.{alias.name}" for alias in node.names)  # ``from engines import base``
    return out


def package_imports(folder: str) -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path, package, PENDING.get(name, set()))
    return graph


def is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules (as a path), or None."""
    edges = {m: sorted(d for d in deps if d in graph and d != m) for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in edges:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_imports_are_read_from_the_code_lazy_and_relative_ones_included(tmp_path):
    (tmp_path / "mod.py").write_text("import os\nfrom . import sib\n\ndef f():\n    from export.exporter import x\n")
    deps = imported_modules(tmp_path / "mod.py", "engines")
    assert {"os", "engines.sib", "export.exporter"} <= deps
    assert "export.exporter" not in imported_modules(tmp_path / "mod.py", "engines", {"f"})


def test_no_engines_module_but_the_session_imports_export():
    graph = package_imports("engines")
    assert "engines.tensorrt_backend" in graph and "engines.base" in graph  # the walk found the package
    offenders = {m: sorted(d for d in deps if is_in(d, "export")) for m, deps in graph.items() if m not in EXPORT_ALLOWED}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_artifacts_import_neither_export_nor_engines():
    """The shared layer sits below both: an import of either would put the circle back."""
    graph = package_imports("mvz/artifacts")
    assert graph, "mvz/artifacts not found"
    bad = {m: sorted(d for d in deps if is_in(d, "export") or is_in(d, "engines")) for m, deps in graph.items()}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_import_cycle_among_engines_modules():
    graph = package_imports("engines")
    graph.pop("engines", None)  # the package's registry imports its backends lazily by design
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("half", ["tensorrt_build", "tensorrt_backend", "tensorrt_refit", "tensorrt_manifest"])
def test_tensorrt_halves_do_not_import_each_other_at_module_level(half):
    """Build, runtime and refit halves share ``tensorrt_common`` (and the pure manifest), nothing else."""
    tree = ast.parse((ROOT / "engines" / f"{half}.py").read_text(encoding="utf-8"))
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    halves = {"engines.tensorrt_build", "engines.tensorrt_backend", "engines.tensorrt_refit"} - {f"engines.{half}"}
    assert not top & halves
