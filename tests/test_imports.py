"""The layout's import rules (docs/ARCHITECTURE.md), read from the source: the evaluator and
the views read the records and never the runtime, the evaluator imports no view, and no
module imports itself back at import time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("collective", "controllers", "topologies")
RUNTIME = ("collective.run", "collective.distributed")
VIEWS = ("collective.report", "collective.live")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """The modules of `known` that `path` imports (at import time, and anywhere at all);
    imports under `if TYPE_CHECKING:` are left out."""
    at_import, anywhere = set(), set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if isinstance(child, ast.ImportFrom):
                    names += [f"{child.module}.{a.name}" for a in child.names]
                hits = {name for name in names if name in known}
                anywhere.update(hits)
                if top:
                    at_import.update(hits)
            else:
                visit(child, top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return at_import, anywhere


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = _modules()
    return {name: _imports(path, set(modules) - {name}) for name, path in modules.items()}


def test_the_evaluator_and_the_views_import_neither_the_runtime_nor_the_evaluator_a_view():
    graph = _graph()
    assert "collective.evaluate.book" in graph and "collective.report.report_view" in graph  # the walk found them
    wrong = sorted(
        f"{module} -> {imported}"
        for module, (_, anywhere) in graph.items() if module.startswith(("collective.evaluate", *VIEWS))
        for imported in anywhere
        if imported.startswith(RUNTIME) or (module.startswith("collective.evaluate") and imported.startswith(VIEWS))
    )
    assert wrong == []


def test_no_module_imports_itself_back_at_import_time():
    graph = {module: at_import for module, (at_import, _) in _graph().items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for imported in graph[module]:
                if imported == start:
                    cycles.append(" -> ".join((*path, start)))
                elif imported not in seen:
                    seen.add(imported)
                    stack.append((imported, (*path, imported)))
    assert cycles == []
