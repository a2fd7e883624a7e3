"""llmc's import graph keeps docs/design.md's layers: no cycle, each folder imports only the layers it may, and
serving an engine imports none of the compiler.

The graph has an arrow for every `import` statement of llmc's modules, at module level or inside a function,
read with ast (nothing is imported). Imports under `if TYPE_CHECKING:` are annotations only and make no arrow.
`from a.b import c` points at a.b.c where that is a module, else at a.b (its __init__).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import llmc

ROOT = Path(llmc.__file__).parent

# docs/design.md, "The pipeline, as folders": what each folder may import besides itself.
MAY_IMPORT = {
    "llmc.plugins": {"llmc.weights"},
    "llmc.frontend": {"llmc.plugins", "llmc.weights", "llmc.engine"},
    "llmc.passes": {"llmc.plugins", "llmc.frontend", "llmc.weights"},
    "llmc.backends": {"llmc.plugins", "llmc.weights", "llmc.engine_error"},
    # engine_cache only inside a function, to build a checkpoint's engine (see test_serving_imports_no_compiler)
    "llmc.runtime": {"llmc.plugins", "llmc.engine", "llmc.engine_error", "llmc.open_runner", "llmc.engine_cache"},
    "llmc.open_runner": {"llmc.backends", "llmc.engine"},
    "llmc.engine": {"llmc.backends", "llmc.engine_error"},
}
COMPILER = ("llmc.compiler", "llmc.frontend", "llmc.passes")


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("llmc", *path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Imports(ast.NodeVisitor):
    """The llmc modules one module's source imports: (name, whether at module level)."""

    def __init__(self, module: str, is_package: bool, modules):
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.depth = 0  # functions we are inside
        self.found: set[tuple[str, bool]] = set()

    def add(self, name: str) -> None:
        if name == "llmc" or name.startswith("llmc."):
            self.found.add((name, self.depth == 0))

    def visit_If(self, node: ast.If) -> None:
        for child in node.orelse if is_type_checking(node.test) else [node.test, *node.body, *node.orelse]:
            self.visit(child)

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            self.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base)


def imports_of(source: str, module: str, is_package: bool, modules) -> set[tuple[str, bool]]:
    visitor = Imports(module, is_package, modules)
    visitor.visit(ast.parse(source))
    return {(name, top) for name, top in visitor.found if name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[tuple[str, bool]]]:
    modules = module_names()
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", modules) for name, path in modules.items()}


def layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_graph_reads_function_level_imports_and_skips_annotation_only_ones():
    source = ("from typing import TYPE_CHECKING\nimport llmc.engine\nif TYPE_CHECKING:\n    from llmc.runtime import llm\n"
              "def f():\n    from llmc.backends import torch_backend\n    from . import base\n")
    modules = {"llmc.engine", "llmc.backends", "llmc.backends.torch_backend", "llmc.backends.base"}
    assert imports_of(source, "llmc.backends.x", False, modules) == {
        ("llmc.engine", True), ("llmc.backends.torch_backend", False), ("llmc.backends.base", False)}


def test_no_import_cycle(graph):
    edges = {module: {name for name, _ in found} for module, found in graph.items()}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' imports '.join(reversed(e.args[1]))}")


def test_each_layer_imports_only_what_docs_design_allows(graph):
    wrong = sorted(f"{module} imports {name}" for module, found in graph.items() for name, _ in found
                   if layer(module) in MAY_IMPORT and layer(name) != layer(module) and layer(name) not in MAY_IMPORT[layer(module)])
    assert wrong == []
    # the seam is used: the runtime opens runners through llmc.open_runner, which the backends never import
    assert ("llmc.open_runner", True) in graph["llmc.runtime.worker"] and ("llmc.open_runner", True) in graph["llmc.runtime.executor"]


def test_serving_imports_no_compiler(graph):
    """What the runtime imports as it loads (module-level imports, followed) holds none of the compiler: serving an
    engine never imports the frontend or the passes (a checkpoint's engine is built inside a function)."""
    seen, todo = set(), [m for m in graph if layer(m) == "llmc.runtime"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [name for name, top in graph[module] if top and name in graph]
    assert "llmc.open_runner" in seen and "llmc.backends.torch_backend" in seen
    assert sorted(m for m in seen if m.startswith(COMPILER)) == []
