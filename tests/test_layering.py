"""The package layering holds, read from the source with ``ast`` (no import runs).

Why from the source and not from ``sys.modules``: a function-level import (the usual way to hide an
import circle) only runs when that function does, so a runtime check would miss exactly the imports
that make a circle. Every ``import`` statement counts here, wherever it stands.

Rules: the modules of ``deposium.convert`` import each other without a circle; no runtime package
(worker, producer, convert) imports ``deposium.bench`` or ``tests``; ``deposium.worker`` imports neither
``deposium.convert`` nor ``deposium.producer`` (the worker image carries neither).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"worker": "deposium.worker", "producer": "deposium.producer", "convert": "deposium.convert",
            "bench": "deposium.bench"}
RUNTIME = ("deposium.worker", "deposium.producer", "deposium.convert")


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name."""
    return {_module_name(path): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules one import statement names (``from a import b`` names ``a.b`` where that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return found if len(found) == len(node.names) else [base, *found]


def import_graph() -> dict[str, set[str]]:
    """module -> every module it imports (top-level or inside a function), for the packages above."""
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    for module, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets.update(_imported(node, module, path.name == "__init__.py", known))
        graph[module] = targets
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_scan_sees_the_imports_it_judges():
    """The rules below pass on an empty graph too: the scan must see known imports, relative ones resolved."""
    graph = import_graph()
    assert "deposium.convert.quantize" in graph["deposium.convert.api"]
    assert "deposium.worker.artifact" in graph["deposium.convert.api"]
    assert _imported(ast.parse("from .graph import GraphIndex").body[0], "deposium.convert.fold", False,
                     {"deposium.convert.graph"}) == ["deposium.convert.graph"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_convert_modules_import_each_other_without_a_circle():
    graph = import_graph()
    convert = {m: {t for t in targets if _within(t, "deposium.convert")}
               for m, targets in graph.items() if _within(m, "deposium.convert")}
    cycle = find_cycle(convert)
    assert cycle is None, "import circle in deposium.convert: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", RUNTIME)
def test_runtime_packages_never_import_the_bench_or_the_tests(package):
    offending = {m: sorted(t for t in targets if _within(t, "deposium.bench") or _within(t, "tests"))
                 for m, targets in import_graph().items() if _within(m, package)}
    assert not {m: t for m, t in offending.items() if t}


def test_the_worker_imports_neither_convert_nor_producer():
    offending = {m: sorted(t for t in targets if _within(t, "deposium.convert") or _within(t, "deposium.producer"))
                 for m, targets in import_graph().items() if _within(m, "deposium.worker")}
    assert not {m: t for m, t in offending.items() if t}
