"""The package's import graph: every module imports, and no two modules import each other in a circle.

The graph is read from the source with ``ast``: an edge A -> B for each ``import`` of B that runs
when A is imported (at module level, inside a module-level ``if``/``try`` too; not under
``if TYPE_CHECKING``, not inside a function). ``python tests/test_imports.py`` prints it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "diffmem"
# The circles the code once had, as pairs: neither may reach the other again, counting
# the imports inside functions too.
UNTIED = [("diffmem.adapters.lab", "diffmem.lab.data"), ("diffmem.detect", "diffmem.detectors.asthana"),
          ("diffmem.detectors.wen", "diffmem.sampling"), ("diffmem.evaluate", "diffmem.judge"),
          ("diffmem.train", "diffmem.mitigate"), ("diffmem.mitigate", "diffmem.mitigations.embedding_opt"),
          ("diffmem.mitigations.embedding_opt", "diffmem.lab.prompts"), ("diffmem.lab.prompts", "diffmem.lab.build"),
          ("diffmem.lab.build", "diffmem.train")]


def module_files() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], in_functions: bool):
    """The import statements of `body` that run on import (and, `in_functions`, those in its functions)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _imports(node.body, in_functions)
            yield from _imports(node.orelse, in_functions)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _imports(block, in_functions)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _imports(node.body, in_functions)
        elif isinstance(node, ast.ClassDef) or (in_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            yield from _imports(node.body, in_functions)


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """{module: the package's modules it imports}; `in_functions` adds the imports inside functions."""
    files = module_files()

    def known(name: str) -> str | None:  # a name, or the module that defines it
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path)).body, in_functions):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE}
                continue
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else known(base) for a in node.names}
        graph[module] = targets - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, todo = set(), [a]
    while todo:
        v = todo.pop()
        if v == b:
            return True
        if v not in seen:
            seen.add(v)
            todo += graph.get(v, ())
    return False


def test_every_module_imports():
    for module in module_files():
        importlib.import_module(module)


def test_no_import_cycles_among_module_level_imports():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_old_cycles_stay_untied_even_through_function_imports():
    graph = import_graph(in_functions=True)
    for a, b in UNTIED:
        assert a in graph and b in graph, f"{a} or {b} is no module any more: update UNTIED"
        assert not (reaches(graph, a, b) and reaches(graph, b, a)), f"{a} and {b} import each other again"


@pytest.mark.parametrize("source, found", [
    ("import diffmem.b\n", {"diffmem.b"}),
    ("from diffmem import b\n", {"diffmem.b"}),
    ("from . import b\n", {"diffmem.b"}),
    ("from diffmem.b import thing\n", {"diffmem.b"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import diffmem.b\n", set()),
    ("def f():\n    import diffmem.b\n", set()),
    ("try:\n    import diffmem.b\nexcept ImportError:\n    pass\n", {"diffmem.b"}),
])
def test_the_graph_reads_module_level_imports_only(tmp_path, monkeypatch, source, found):
    package = tmp_path / "diffmem"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(source)
    (package / "b.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert import_graph()["diffmem.a"] == found


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    graph = import_graph(in_functions="--functions" in sys.argv)
    for module in sorted(graph):
        print(module, "->", ", ".join(sorted(graph[module])) or "-")
    print("cycles:", cycles(graph) or "none")
